"""MODEL_DIR or a Hugging Face hub id (`org/name`, as vLLM takes): the local checkpoint directory to open.

    resolve_model("path/to/dir")            -> that directory (nothing is looked up)
    resolve_model("Qwen/Qwen1.5-MoE-A2.7B") -> its snapshot in the Hugging Face cache: downloaded with
                                               progress when not cached (or not at `revision`'s commit), the
                                               cached snapshot when the hub cannot be reached or HF_HUB_OFFLINE
                                               is set

Only what the engine reads is downloaded: top-level config / tokenizer / generation JSON, chat templates,
`*.safetensors` and their index, tokenizer.model (no `*.bin`, no `original/` copies of the weights).
`config_only` (simulate: a config.json is enough) fetches config.json alone. The cache is huggingface_hub's
(HF_HUB_CACHE / HF_HOME, default ~/.cache/huggingface/hub). Every failure is one line that names the id and
says how to get the files (`hf download ...`). This module does not open or check the checkpoint.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")   # org/name, one slash
ALLOW = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
IGNORE = ["*/*"]                        # top level only: no original/, metal/ copies of the weights
OFFLINE_VALUES = ("1", "ON", "YES", "TRUE")


def _not_cached(errors) -> tuple[type, ...]:
    """huggingface_hub's exceptions for 'not (fully) in the cache and not downloadable now' (IncompleteSnapshotError
    is newer than the oldest version transformers accepts)."""
    names = ("LocalEntryNotFoundError", "IncompleteSnapshotError", "OfflineModeIsEnabled")
    return tuple(getattr(errors, n) for n in names if hasattr(errors, n))


def is_hub_id(name: str) -> bool:
    """True when `name` reads as `org/name` and is not an existing path."""
    return bool(HUB_ID.match(name)) and not os.path.exists(name) and not name.startswith(("./", "../"))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in OFFLINE_VALUES or bool(constants.HF_HUB_OFFLINE)


def download_command(repo_id: str, revision: str | None, config_only: bool = False) -> str:
    rev = f" --revision {revision}" if revision else ""
    files = " config.json" if config_only else (" --include '*.json' '*.safetensors' 'tokenizer.model' '*.jinja' "
                                                  "'*.txt' --exclude '*/*'")
    return f"hf download {repo_id}{files}{rev}"


def resolve_model(name: str | Path, revision: str | None = None, progress: bool = True,
                  config_only: bool = False, cache_dir: str | Path | None = None) -> Path:
    """A local directory as it is; an `org/name` hub id -> its snapshot directory in the Hugging Face cache.
    `revision` (a branch, tag or commit) applies to hub ids only; cache_dir: instead of huggingface_hub's."""
    text = str(name)
    if not is_hub_id(text):
        if revision is not None:
            raise CheckpointError(f"--revision {revision} applies to a Hugging Face hub id (org/name), and "
                                  f"{text} is a local path; drop --revision or give the hub id")
        return Path(text)
    return _snapshot(text, revision, progress, config_only, cache_dir)


def _snapshot(repo_id: str, revision: str | None, progress: bool, config_only: bool, cache_dir) -> Path:
    from huggingface_hub import errors, snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    offline = hub_offline()
    how = download_command(repo_id, revision, config_only)
    at = f" at revision {revision}" if revision else ""
    where = f"{repo_id} is not a local directory; as a Hugging Face hub id"
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline,
                                 allow_patterns=["config.json"] if config_only else ALLOW, ignore_patterns=IGNORE)
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{where}: --revision {revision} does not exist on the hub; give a branch, tag or "
                              f"commit of {repo_id}") from None
    except errors.GatedRepoError:
        raise CheckpointError(f"{where}: {repo_id} is gated; accept its terms on huggingface.co, log in with "
                              f"`hf auth login`, then run `{how}`") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"{where}: not found on the hub (or private: log in with `hf auth login`); check "
                              f"the name or give a checkpoint directory") from None
    except _not_cached(errors) as e:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        state = "only partly in" if "Incomplete" in type(e).__name__ else "not in"
        raise CheckpointError(f"{where}: {state} the Hugging Face cache{at} and {why}; download it with "
                              f"`{how}` and rerun") from None
    except Exception as e:   # noqa: BLE001 - network, disk, HTTP: one line with the way out
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{where}: downloading failed ({type(e).__name__}: {first}); download it with "
                              f"`{how}` and rerun") from None
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    return Path(path)
