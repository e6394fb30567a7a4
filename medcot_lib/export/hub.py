"""The push to the Hugging Face Hub: merged model, adapter, GGUFs, Modelfile and card, one private commit."""

from __future__ import annotations

from pathlib import Path

from .. import __version__, models
from ..errors import MedcotError
from .inputs import adapter_dir
from .paths import EXPORT_DIR, merged_dir


def push(cfg, run_dir: str | Path, files: dict[str, Path]) -> dict:
    """Upload merged model, adapter, GGUFs, Modelfile and card in one commit, only when push_to_hub is true.

    The token comes from HF_TOKEN in the environment only. The repository is created private; making it
    public is a deliberate step on the Hub.
    """
    run_dir = Path(run_dir)
    card = run_dir / EXPORT_DIR / "README.md"
    if not cfg.push_to_hub:
        return {"pushed": False, "dry_run": True, "card": str(card), "reason": "push_to_hub is false; nothing was uploaded"}
    token = models.hub_token()
    if not token:
        raise MedcotError("push_to_hub is true but HF_TOKEN is not set in the environment (it is never a parameter)")
    from huggingface_hub import CommitOperationAdd, HfApi

    uploads = {path.relative_to(merged_dir(run_dir)).as_posix(): path for path in merged_dir(run_dir).rglob("*") if path.is_file()}
    adapter = adapter_dir(run_dir)
    uploads |= {f"adapter/{path.relative_to(adapter).as_posix()}": path for path in adapter.rglob("*") if path.is_file()}
    uploads |= {path.name: Path(path) for path in files.values()}
    uploads |= {name: run_dir / EXPORT_DIR / name for name in ("README.md", "Modelfile") if (run_dir / EXPORT_DIR / name).is_file()}
    api = HfApi(token=token)
    api.create_repo(cfg.hub_model_id, private=True, exist_ok=True)
    commit = api.create_commit(cfg.hub_model_id, operations=[CommitOperationAdd(name, str(path)) for name, path in uploads.items()],
                               commit_message=f"medcot {__version__}: {cfg.run_name}")
    return {"pushed": True, "dry_run": False, "repo": cfg.hub_model_id, "files": len(uploads), "commit": commit.commit_url}
