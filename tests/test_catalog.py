"""anneal.checkpoints.catalog: the bundled catalog, user catalogs, resolving names/paths/hub ids (offline: the
network is never touched), and one clear error for each bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from anneal.checkpoints.catalog import (
    STAGES,
    Catalog,
    CatalogEntry,
    ResolvedCheckpoint,
    bundled_catalog_path,
    format_catalog_table,
    read_catalog_file,
    validate_checkpoint_folder,
)
from anneal.errors import AnnealError


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Offline, with an empty private HF cache: a test that tried the network would fail."""
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))   # no user catalog of this machine's user


def fake_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "dots1"}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def write_catalog(path: Path, entries: list[dict]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"checkpoints": entries}))
    return path


# ---------------------------------------------------------------------------------------------
# the bundled catalog
# ---------------------------------------------------------------------------------------------
def test_bundled_catalog_contents():
    cat = Catalog.load()
    names = cat.names()
    assert bundled_catalog_path().name == "catalog.yaml"
    for n in [f"dots1.base-{i}T" for i in range(1, 11)] + ["dots1.pre-anneal", "dots1.post-anneal",
                                                             "dots1.base", "dots1.inst", "tiny-stable"]:
        assert n in cat, n
    assert all(e.stage in STAGES for e in cat.entries.values())
    base, inst = cat.get("dots1.base"), cat.get("dots1.inst")
    assert (base.repo_id, base.verified) == ("rednote-hilab/dots.llm1.base", True)
    assert (inst.repo_id, inst.stage) == ("rednote-hilab/dots.llm1.inst", "sft")
    for i in range(1, 11):
        e = cat.get(f"dots1.base-{i}T")
        assert (e.stage, e.lr, e.tokens_seen) == ("stable", 3e-4, i * 10**12)
        assert not e.verified and e.repo_id is None and "unverified" in e.notes.lower()
    tiny = cat.get("tiny-stable")
    import anneal

    assert tiny.path == Path(anneal.__file__).resolve().parent / "assets" / "tiny-stable"
    assert (tiny.stage, tiny.lr, tiny.repo_id) == ("stable", 3e-4, None)
    assert names.index("tiny-stable") == 0


def test_rows_and_table():
    cat = Catalog.load()
    rows = cat.rows()
    assert len(rows) == len(cat)
    row = next(r for r in rows if r["name"] == "dots1.base-10T")
    assert row == {"name": "dots1.base-10T", "stage": "stable", "tokens": "10T", "lr": "0.0003",
                   "location": "(repo id unknown)", "verified": "no"}
    text = format_catalog_table(cat, plain=True)
    assert "dots1.inst" in text and "rednote-hilab/dots.llm1.inst" in text and text.splitlines()[0].startswith("name")
    from rich.table import Table

    table = format_catalog_table(cat)
    assert isinstance(table, Table) and table.row_count == len(cat)


# ---------------------------------------------------------------------------------------------
# resolve
# ---------------------------------------------------------------------------------------------
def test_resolve_local_folder(tmp_path):
    folder = fake_checkpoint(tmp_path / "ck")
    got = Catalog.load().resolve(str(folder))
    assert got == ResolvedCheckpoint(str(folder), folder, None)
    assert Catalog.load().resolve(folder).path == folder  # PathLike too


def test_resolve_catalog_name_with_local_path(tmp_path):
    fake_checkpoint(tmp_path / "cks" / "mine")
    user = write_catalog(tmp_path / "cks" / "my_catalog.yaml",
                         [{"name": "mine", "path": "mine", "stage": "post-anneal", "lr": "1e-5",
                           "tokens_seen": "11.2T"}])
    cat = Catalog.load([str(user)])
    got = cat.resolve("mine")
    assert got.name == "mine" and got.path == tmp_path / "cks" / "mine"  # relative to the catalog file
    assert got.entry.lr == 1e-5 and got.entry.tokens_seen == 11_200_000_000_000
    assert got.entry.source == str(user)


def test_user_catalog_overrides_by_name(tmp_path):
    user = write_catalog(tmp_path / "fix.yaml", [{"name": "dots1.base-3T", "repo_id": "someone/dots-3T",
                                                  "revision": "abc123", "stage": "stable", "lr": 3.0e-4,
                                                  "tokens_seen": "3T", "verified": True}])
    cat = Catalog.load([user])
    e = cat.get("dots1.base-3T")
    assert (e.repo_id, e.revision, e.verified) == ("someone/dots-3T", "abc123", True)
    assert len(cat) == len(Catalog.load())
    with pytest.raises(AnnealError) as err:  # offline + not cached: says how to download that revision
        cat.resolve("dots1.base-3T")
    assert "huggingface-cli download someone/dots-3T --revision abc123" in str(err.value)


def test_resolve_unknown_name_suggests_close_ones():
    with pytest.raises(AnnealError) as err:
        Catalog.load().resolve("dots1.bsae-10T")
    msg = str(err.value)
    assert "'dots1.base-10T'" in msg and "anneal-catalog" in msg
    with pytest.raises(AnnealError, match="not a catalog name"):
        Catalog.load().get("zzz")


def test_resolve_missing_path_like_input(tmp_path):
    with pytest.raises(AnnealError, match="folder does not exist"):
        Catalog.load().resolve(str(tmp_path / "nope"))
    with pytest.raises(AnnealError, match="folder does not exist"):
        Catalog.load().resolve("./relative/nope")


def test_resolve_hub_id_offline_not_cached_is_one_clear_error():
    for name, repo in (("dots1.base", "rednote-hilab/dots.llm1.base"),
                       ("rednote-hilab/dots.llm1.inst", "rednote-hilab/dots.llm1.inst")):
        with pytest.raises(AnnealError) as err:
            Catalog.load().resolve(name)
        msg = str(err.value)
        assert "not in the local HF cache" in msg and "HF_HUB_OFFLINE" in msg
        assert f"huggingface-cli download {repo}" in msg and "local folder" in msg
    with pytest.raises(AnnealError, match=r"huggingface-cli download a/b --revision v1"):
        Catalog.load().resolve("a/b@v1", offline=True)


def test_resolve_hub_id_from_offline_cache(tmp_path):
    """A snapshot already in the HF cache resolves offline (cache layout as huggingface_hub writes it)."""
    repo = tmp_path / "hf_cache" / "models--rednote-hilab--dots.llm1.base"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = fake_checkpoint(repo / "snapshots" / commit)
    got = Catalog.load().resolve("dots1.base")
    assert got.path == snap and got.entry.name == "dots1.base"


def test_resolve_entry_without_repo_id_explains():
    with pytest.raises(AnnealError) as err:
        Catalog.load().resolve("dots1.pre-anneal")
    msg = str(err.value)
    assert "repo id is not known" in msg and "collections/rednote-hilab" in msg and "catalog file" in msg


def test_resolve_catalog_path_missing(tmp_path):
    user = write_catalog(tmp_path / "c.yaml", [{"name": "gone", "path": "gone", "stage": "stable"}])
    with pytest.raises(AnnealError, match=r"checkpoint 'gone' \(catalog .*c\.yaml\): folder .*gone does not exist"):
        Catalog.load([user]).resolve("gone")


def test_validate_checkpoint_folder(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(AnnealError, match=r"config\.json is missing"):
        validate_checkpoint_folder(d)
    (d / "config.json").write_text("{}")
    with pytest.raises(AnnealError, match=r"model\.safetensors .* is missing"):
        validate_checkpoint_folder(d)
    (d / "x.safetensors").write_bytes(b"")
    with pytest.raises(AnnealError, match=r"found \['x\.safetensors'\] but no index"):
        Catalog.load().resolve(str(d))
    (d / "model.safetensors.index.json").write_text("{}")
    assert validate_checkpoint_folder(d) == d


# ---------------------------------------------------------------------------------------------
# catalog file errors: file + entry + field
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry, match", [
    ({"name": "a", "stage": "warmup", "repo_id": "o/n"}, r"entry 'a': field 'stage' must be one of"),
    ({"name": "a", "stage": "stable", "repo": "o/n"}, r"entry 'a': field 'repo' is not a catalog field "
                                                      r"\(did you mean 'repo_id'\?\)"),
    ({"name": "a", "stage": "stable", "repo_id": "o/n", "path": "x"}, r"entry 'a': field 'path' and 'repo_id'"),
    ({"name": "a", "stage": "stable", "repo_id": "not a repo"}, r"entry 'a': field 'repo_id' must be"),
    ({"name": "a", "stage": "stable", "lr": "fast"}, r"entry 'a': field 'lr' must be a non-negative number"),
    ({"name": "a", "stage": "stable", "tokens_seen": "lots"}, r"entry 'a': field 'tokens_seen'"),
    ({"name": "a", "stage": "stable", "tokens_seen": -5}, r"entry 'a': field 'tokens_seen' must be >= 0"),
    ({"name": "a", "stage": "stable", "verified": "yes"}, r"entry 'a': field 'verified' must be true or false"),
    ({"name": "a", "stage": "stable", "revision": [1]}, r"entry 'a': field 'revision'"),
    ({"stage": "stable"}, r"entry 0: field 'name' is required"),
])
def test_catalog_file_errors_name_file_entry_field(tmp_path, entry, match):
    f = write_catalog(tmp_path / "bad.yaml", [entry])
    with pytest.raises(AnnealError, match=match) as err:
        Catalog.load([f])
    assert str(f) in str(err.value)


def test_catalog_file_structure_errors(tmp_path):
    f = tmp_path / "c.yaml"
    with pytest.raises(AnnealError, match="catalog file not found"):
        read_catalog_file(f)
    f.write_text("checkpoints: [\n")
    with pytest.raises(AnnealError, match="not valid YAML"):
        read_catalog_file(f)
    f.write_text("entries: []\n")
    with pytest.raises(AnnealError, match="unknown top-level key 'entries'"):
        read_catalog_file(f)
    f.write_text("checkpoints: 3\n")
    with pytest.raises(AnnealError, match="expected 'checkpoints:'"):
        read_catalog_file(f)
    write_catalog(f, [{"name": "a", "stage": "sft"}, {"name": "a", "stage": "sft"}])
    with pytest.raises(AnnealError, match="entry 'a' is defined twice"):
        read_catalog_file(f)
    f.write_text("- {name: b, stage: sft, path: /abs/b}\n")  # a bare list is accepted too
    (e,) = read_catalog_file(f)
    assert e == CatalogEntry(name="b", stage="sft", path=Path("/abs/b"), source=str(f))
    assert e.location == "/abs/b"


# ---------------------------------------------------------------------------------------------
# anneal-catalog --refresh: the hub repo's refs -> the user catalog
# ---------------------------------------------------------------------------------------------
def _fake_refs(calls):
    from huggingface_hub import GitRefInfo, GitRefs

    def list_repo_refs(repo_id, **kw):      # the hub's answer; parsing and writing below are real
        calls.append(repo_id)
        ref = lambda name, kind="heads": GitRefInfo(name=name, ref=f"refs/{kind}/{name}",  # noqa: E731
                                                     target_commit=f"{len(calls)}{name}".ljust(40, "0")[:40])
        return GitRefs(branches=[ref("main"), ref("stable-10T"), ref("stable-1T"), ref("exp-a")],
                       converts=[], tags=[ref("v1.0", "tags")])
    return list_repo_refs


def test_refresh_writes_the_user_catalog_that_resolves_by_revision(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    from anneal.checkpoints.catalog import user_catalog_path
    from anneal.checkpoint_cli import catalog_main

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []
    monkeypatch.setattr(huggingface_hub, "list_repo_refs", _fake_refs(calls))
    user_catalog_path().parent.mkdir(parents=True)
    write_catalog(user_catalog_path(), [{"name": "mine", "path": str(tmp_path), "stage": "sft"}])
    catalog_main(["--refresh"])
    assert calls == ["rednote-hilab/dots.llm1.base"]
    out = capsys.readouterr().out
    assert f"4 refs of rednote-hilab/dots.llm1.base written to {user_catalog_path()}" in out
    cat = Catalog.load()                       # picks the user catalog up without catalog_files
    e = cat.get("dots1.base-10T")              # replaces the bundled entry that had no repo id
    assert (e.repo_id, e.revision, e.tokens_seen, e.stage, e.lr, e.verified) == \
        ("rednote-hilab/dots.llm1.base", "stable-10T", 10 ** 13, "stable", 3e-4, True)
    assert cat.get("dots1.base-1T").revision == "stable-1T"
    other = cat.get("dots1.base@exp-a")
    assert other.tokens_seen is None and other.lr is None and "unknown" in other.notes
    assert cat.get("dots1.base@v1.0").revision == "v1.0" and "tag 'v1.0'" in cat.get("dots1.base@v1.0").notes
    assert "dots1.base@main" not in cat and cat.get("mine").stage == "sft"   # the user's own entry is kept
    # resolving uses the revision: the branch's snapshot in the HF cache, not main's
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hf_cache" / "models--rednote-hilab--dots.llm1.base"
    (repo / "refs").mkdir(parents=True)
    for branch, commit in (("main", "a" * 40), ("stable-10T", "b" * 40)):
        (repo / "refs" / branch).write_text(commit)
        fake_checkpoint(repo / "snapshots" / commit)
    assert cat.resolve("dots1.base-10T").path.name == "b" * 40
    assert cat.resolve("dots1.base").path.name == "a" * 40


def test_refresh_offline_is_one_line_and_writes_nothing(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    from anneal.checkpoints.catalog import user_catalog_path
    from anneal.checkpoint_cli import catalog_main

    with pytest.raises(SystemExit) as ex:
        catalog_main(["--refresh"])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert "offline (HF_HUB_OFFLINE is set)" in err and len(err.strip().splitlines()) == 1
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(repo_id, **kw):
        raise ConnectionError("[Errno -2] Name or service not known")
    monkeypatch.setattr(huggingface_hub, "list_repo_refs", unreachable)
    with pytest.raises(SystemExit):
        catalog_main(["--refresh", "--out", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert "cannot reach the Hugging Face hub" in err and "ConnectionError" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.yaml").exists() and not user_catalog_path().exists()


def test_catalog_command_never_wraps_a_location(tmp_path, capsys):
    """At 80 columns the table fits and every location is printed whole on one line (a path
    folded mid-word cannot be copied)."""
    from anneal.checkpoint_cli import catalog_main

    deep = fake_checkpoint(tmp_path / "a_rather_long_folder_name" / "checkpoints_of_my_own_anneals" / "run_0042")
    user = write_catalog(tmp_path / "c.yaml", [{"name": "mine", "path": str(deep), "stage": "sft"}])
    catalog_main(["--catalog", str(user)])
    lines = capsys.readouterr().out.splitlines()
    assert f"mine: {deep}" in lines and "rednote-hilab/dots.llm1.inst" in "\n".join(lines)
    assert max(len(line) for line in lines if "│" in line or "┃" in line) <= 80
