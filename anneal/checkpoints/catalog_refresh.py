"""`anneal-catalog --refresh`: the intermediate dots.llm1 checkpoints are branches and tags of the
hub repo `rednote-hilab/dots.llm1.base`; this lists them with `huggingface_hub.list_repo_refs` and
writes one entry per ref into the user catalog (`user_catalog_path()`), which `Catalog.load`
reads after the bundled one.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from anneal.checkpoints.atomic import atomic_write
from anneal.checkpoints.catalog import DOTS1_BASE_REPO, offline_from_env, read_catalog_file, user_catalog_path
from anneal.errors import AnnealError
from mixtures.tokens import format_tokens

_TOKENS_IN_REF = re.compile(r"(\d+(?:\.\d+)?)\s*([TB])(?![a-z])", re.IGNORECASE)


def entries_from_refs(repo_id: str, refs) -> list[dict]:
    """Catalog entries (raw dicts, the YAML format) for the branches and tags of `repo_id`
    (`huggingface_hub.GitRefs`). A ref whose name holds a token count ("10T", "500B") becomes
    `dots1.base-<count>` (replacing the bundled entry of that name: it now has its revision);
    any other ref `dots1.base@<ref>`; the default branch is `dots1.base` (already bundled) and is
    skipped. Stage and LR follow from the count (stable phase up to 10T, LR 3e-4); a ref without
    a count gets stage 'stable' and no LR, and its notes say to check both."""
    out = []
    for kind, ref_list in (("branch", refs.branches), ("tag", refs.tags)):
        for ref in sorted(ref_list, key=lambda r: r.name):
            if kind == "branch" and ref.name == "main":
                continue
            m = _TOKENS_IN_REF.search(ref.name)
            tokens = round(float(m.group(1)) * (1e12 if m.group(2).upper() == "T" else 1e9)) if m else None
            entry = {"name": f"dots1.base-{format_tokens(tokens)}" if m else f"dots1.base@{ref.name}",
                     "repo_id": repo_id, "revision": ref.name, "tokens_seen": tokens, "stage": "stable",
                     "lr": 3.0e-4 if tokens is not None and tokens <= 10 ** 13 else None, "verified": True}
            why = ("stage and LR inferred from the token count in the name" if tokens is not None and tokens <= 10 ** 13
                   else "stage and LR unknown: check the dots1 tech report and fix them here")
            entry["notes"] = (f"{kind} '{ref.name}' of {repo_id} at commit {ref.target_commit} "
                              f"(found by anneal-catalog --refresh); {why}.")
            out.append(entry)
    return out


def refresh_catalog(repo_id: str = DOTS1_BASE_REPO, out: str | os.PathLike | None = None) -> tuple[Path, list[dict]]:
    """List `repo_id`'s refs on the hub and merge one entry per ref into the catalog file `out`
    (default `user_catalog_path()`; its other entries are kept). Returns (file, new entries)."""
    from huggingface_hub import list_repo_refs

    if offline_from_env():
        raise AnnealError(f"anneal-catalog --refresh: offline (HF_HUB_OFFLINE is set); cannot list the refs of "
                          f"{repo_id}; run it on a machine with internet access")
    try:
        refs = list_repo_refs(repo_id)
    except Exception as e:  # connection errors differ across huggingface_hub/requests/httpx versions
        cause = " ".join(str(e).split())[:200]
        raise AnnealError(f"anneal-catalog --refresh: cannot reach the Hugging Face hub to list the refs of {repo_id} "
                          f"(offline? {type(e).__name__}: {cause}); the catalog is unchanged") from None
    found = entries_from_refs(repo_id, refs)
    path = Path(out) if out is not None else user_catalog_path()
    import yaml

    kept = []
    if path.is_file():
        read_catalog_file(path)   # refuse to rewrite a file that is not a valid catalog
        data = yaml.safe_load(path.read_text())
        kept = data["checkpoints"] if isinstance(data, dict) else data
    names = {e["name"] for e in found}
    merged = [e for e in kept if e.get("name") not in names] + found
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (f"# Written by anneal-catalog --refresh from the refs of {repo_id}; edit freely.\n"
            + yaml.safe_dump({"checkpoints": merged}, sort_keys=False, width=100))

    def write(tmp: Path) -> None:
        tmp.write_text(text)
        read_catalog_file(tmp)    # what we write must load

    atomic_write(path, write)
    return path, found
