"""The hub-id data path, tested offline: local directories laid out like the hub datasets the recipes name.

`datasets.load_dataset(directory, config)` reads a directory whose README.md carries a `configs:` YAML header
by the same code path as a hub id (config resolution, data files, splits), so these directories stand in for
FreedomIntelligence/medical-o1-reasoning-SFT, GBaker/MedQA-USMLE-4-options and qiaojin/PubMedQA. Their rows are
our own bundled samples (plus a few items written for these tests); educational, not for clinical use.
"""

import json
from pathlib import Path

import pytest

from medcot_lib import data, pipeline, recipe
from medcot_lib.errors import MedcotError

# Written for medcot (educational, not for clinical use): the zh configs' rows and the _mix configs' general items.
ZH_ITEMS = [
    {"Question": "一名32岁女性月经量多，近半年乏力、活动后心悸。血红蛋白95 g/L，MCV 72 fL，血清铁蛋白8 μg/L。最可能的诊断是什么？",
     "Complex_CoT": "贫血为小细胞性（MCV降低）。小细胞贫血主要考虑缺铁、地中海贫血和慢性病贫血。铁蛋白8 μg/L明显降低，"
                    "说明体内铁储备耗竭，这在地中海贫血和慢性病贫血中都不常见。结合长期月经过多这一慢性失血来源，诊断为缺铁性贫血。",
     "Response": "缺铁性贫血，多由月经过多引起的慢性失血所致。应口服补铁，并查明月经过多的原因。"},
    {"Question": "一名60岁男性胸痛1小时，心电图示II、III、aVF导联ST段抬高。最可能闭塞的是哪支冠状动脉？",
     "Complex_CoT": "II、III、aVF导联反映心脏下壁。下壁心肌大多由右冠状动脉供血，少数由左回旋支供血。"
                    "因此下壁ST段抬高型心肌梗死最常见的罪犯血管是右冠状动脉。",
     "Response": "右冠状动脉（下壁心肌梗死）。应尽快行再灌注治疗，并警惕右心室受累时硝酸酯类药物引起的低血压。"},
    {"Question": "一名19岁1型糖尿病患者呕吐、腹痛2天。血糖28 mmol/L，动脉血pH 7.12，血酮体明显升高。诊断和首要处理是什么？",
     "Complex_CoT": "高血糖、代谢性酸中毒和酮体升高三者同时存在，符合糖尿病酮症酸中毒。"
                    "首要处理是静脉补液纠正脱水，在确认血钾不低后持续静脉输注胰岛素，并密切监测和补充钾。",
     "Response": "糖尿病酮症酸中毒。首先静脉补液，再静脉输注胰岛素，同时监测血钾、血糖和酸碱状态。"},
]
EN_GENERAL = {"Question": "Why does the daytime sky look blue?",
              "Complex_CoT": "Sunlight holds every visible wavelength. Air molecules scatter short wavelengths far more than "
                             "long ones (Rayleigh scattering grows as the inverse fourth power of wavelength), so scattered "
                             "blue light reaches the eye from every direction of the sky.",
              "Response": "Air molecules scatter blue light much more strongly than red, so the sky glows blue."}
ZH_GENERAL = {"Question": "为什么冬天呼气时能看到白雾？",
              "Complex_CoT": "呼出的气体温暖且含有较多水蒸气。遇到寒冷空气后迅速降温，水蒸气凝结成许多微小水滴，这些水滴散射光线，看起来就是白雾。",
              "Response": "呼出的水蒸气遇冷凝结成微小水滴，所以看到白雾。"}


def _readme(name: str, configs: list[dict]) -> str:
    lines = ["---", "license: apache-2.0", "configs:"]
    for config in configs:
        lines.append(f"- config_name: {config['name']}")
        lines.append("  data_files:")
        for split, file in config["files"].items():
            lines += [f"  - split: {split}", f"    path: {file}"]
    return "\n".join(lines + ["---", f"# {name} (offline stand-in)", "", "Rows written for medcot; educational, "
                                                                              "not for clinical use.", ""])


def _write_parquet(path: Path, rows: list[dict]) -> None:
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).to_parquet(str(path))


def _bundled_rows(name: str) -> list:
    return [item for _, _, item in data.read_items(recipe.bundled_path(f"bundled:{name}"))]


def build_medical_o1(root: Path) -> Path:
    """medical-o1-reasoning-SFT: one JSON array per config, as on the hub."""
    english = _bundled_rows("medical-o1-concise")[:12]
    files = {"en": ("medical_o1_sft.json", english), "zh": ("medical_o1_sft_Chinese.json", ZH_ITEMS),
             "en_mix": ("medical_o1_sft_mix.json", english[:6] + [EN_GENERAL]),
             "zh_mix": ("medical_o1_sft_mix_Chinese.json", ZH_ITEMS + [ZH_GENERAL])}
    directory = root / "medical-o1-reasoning-SFT"
    directory.mkdir(parents=True)
    for file, rows in files.values():
        (directory / file).write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    configs = [{"name": name, "files": {"train": file}} for name, (file, _) in files.items()]
    (directory / "README.md").write_text(_readme("medical-o1-reasoning-SFT", configs), encoding="utf-8")
    return directory


def build_medqa(root: Path) -> Path:
    """MedQA-USMLE-4-options: train and test parquet files under data/ (4-option rows only)."""
    rows = [r for r in _bundled_rows("medqa") if len(r["options"]) == 4]
    directory = root / "MedQA-USMLE-4-options"
    _write_parquet(directory / "data" / "train-00000-of-00001.parquet", rows[:20])
    _write_parquet(directory / "data" / "test-00000-of-00001.parquet", rows[20:30])
    configs = [{"name": "default", "files": {"train": "data/train-*.parquet", "test": "data/test-*.parquet"}}]
    (directory / "README.md").write_text(_readme("MedQA-USMLE-4-options", configs), encoding="utf-8")
    return directory


def build_pubmedqa(root: Path) -> Path:
    """PubMedQA: the pqa_labeled config's parquet, rows in the hub's nested shape."""
    keyed = json.loads(recipe.bundled_path("bundled:pubmedqa").read_text(encoding="utf-8"))
    rows = [{"pubid": int(pmid), "question": item["QUESTION"],
             "context": {"contexts": item["CONTEXTS"], "labels": item["LABELS"], "meshes": item.get("MESHES", [])},
             "long_answer": item["LONG_ANSWER"], "final_decision": item["final_decision"]} for pmid, item in keyed.items()]
    directory = root / "PubMedQA"
    _write_parquet(directory / "pqa_labeled" / "train-00000-of-00001.parquet", rows)
    configs = [{"name": "pqa_labeled", "files": {"train": "pqa_labeled/train-*.parquet"}}]
    (directory / "README.md").write_text(_readme("PubMedQA", configs), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def hub(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("hub")
    monkeypatch_module.setenv("HF_DATASETS_CACHE", str(root / ".datasets-cache"))  # never the user's cache
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    return {"o1": build_medical_o1(root), "medqa": build_medqa(root), "pubmedqa": build_pubmedqa(root)}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def load(path, **kw):
    return data.load_source(recipe.DatasetSource(path=str(path), **kw))


@pytest.mark.parametrize("config, count, first_word", [("en", 12, None), ("zh", 3, "一名"), ("en_mix", 7, None), ("zh_mix", 4, "一名")])
def test_medical_o1_configs_load_through_load_dataset(hub, config, count, first_word):
    records, report = load(hub["o1"], config=config)
    assert report.format == "medical_o1" and report.kept == count
    assert report.path == f"{hub['o1']} (config {config}, split train)"
    assert all(r.reasoning and r.answer for r in records)
    if first_word:
        assert records[0].question.startswith(first_word)


def test_medqa_splits_and_pubmedqa_config_load(hub):
    test, report = load(hub["medqa"], split="test")
    train, _ = load(hub["medqa"])
    assert report.format == "mcq" and len(test) == 10 and len(train) == 20
    assert all(r.gold in r.options for r in test)
    pubmedqa, report = load(hub["pubmedqa"], config="pqa_labeled")
    assert report.format == "pubmedqa" and len(pubmedqa) == report.read
    assert {r.gold for r in pubmedqa} <= {"yes", "no", "maybe"} and all(r.context for r in pubmedqa)


def test_unknown_config_or_split_names_the_directory_and_what_exists(hub):
    with pytest.raises(MedcotError, match=r"medical-o1-reasoning-SFT: the dataset directory \(config 'fr', split 'train'\) "
                                          r"could not be loaded: .*en_mix"):
        load(hub["o1"], config="fr")
    with pytest.raises(MedcotError, match=r"MedQA-USMLE-4-options: the dataset directory \(config None, split 'validation'\)"):
        load(hub["medqa"], split="validation")


def test_a_bad_row_is_named_by_row_and_field(hub, tmp_path):
    directory = tmp_path / "bad-medqa"
    rows = [r for r in _bundled_rows("medqa") if len(r["options"]) == 4][:3]
    rows[2] = {**rows[2], "answer_idx": "F"}
    _write_parquet(directory / "data" / "test-00000-of-00001.parquet", rows)
    (directory / "README.md").write_text(_readme("bad", [{"name": "default", "files": {"test": "data/test-*.parquet"}}]))
    with pytest.raises(MedcotError, match=r"bad-medqa \(config default, split test\), row 3, field 'answer_idx'"):
        load(directory, split="test")


def test_a_recipe_naming_the_directories_prepares_like_the_hub_recipe(hub, tmp_path):
    cfg = recipe.validate({
        "run_name": "hub-layout", "min_cot_chars": 0, "val_size": 2, "test_size": 2,
        "dataset_mixture": [{"path": str(hub["o1"]), "config": "en"}, {"path": str(hub["o1"]), "config": "zh"}],
        "eval_datasets": [{"path": str(hub["medqa"]), "split": "test"}, {"path": str(hub["pubmedqa"]), "config": "pqa_labeled"}],
    })
    assert [s.label for s in cfg.dataset_mixture] == ["medical-o1-reasoning-SFT-en", "medical-o1-reasoning-SFT-zh"]
    prepared = data.prepare(cfg)
    decontaminated = next(s.dropped for s in prepared.steps if s.step == "decontaminate")
    assert sum(len(v) for v in prepared.splits.values()) == 12 + 3 - decontaminated
    assert sum(r.source.endswith("-zh") for v in prepared.splits.values() for r in v) == 3
    assert set(prepared.eval_sets) == {"MedQA-USMLE-4-options", "PubMedQA-pqa_labeled"}
    hashes = pipeline.data_hashes(cfg)
    assert hashes[str(hub["o1"])].startswith("sha256 of 5 files:")
