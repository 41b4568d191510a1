"""`bond export` and the dataset in the Hugging Face ecosystem: the card's YAML (configs, features,
license, provenance), `load_dataset` / `load_from_disk` of the exported folders (moved elsewhere
too), the refusals (one `error:` line, exit 2, nothing written), and the README's TRL recipe: its loss
against a per-example loop, and a plain SFTTrainer that ignores the weights."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bond_data import build
from bond_data.files import folder_sha256
from bond_data.prompts import add_prompts
from bond_data.store import Store
from flows.cli import main

from testutil import run_generation, run_scoring, tree_digest, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory, untrained_model):
    """A store with round 0 generated (k = 4), scored and built (n = 2); a chat prompt among them."""
    tmp = tmp_path_factory.mktemp("export")
    st = Store(tmp / "store")
    st.register_anchor(0, str(untrained_model), folder_sha256(untrained_model))
    records = [{"prompt": f"sort: {w} ="} for w in ["dbca", "zyx", "hello", "qwerty", "mno"]]
    records.append({"messages": [{"role": "system", "content": "sort letters"}, {"role": "user", "content": "kite"}]})
    add_prompts(st, write_jsonl(tmp / "prompts.jsonl", records))
    run_generation(st, k=4, max_new_tokens=6)
    run_scoring(st)
    record = build.build_dataset(st, 0, n=2, license="cc-by-4.0")
    return st, record


def export(capsys, store: Store, *args: str) -> tuple[int, str, str]:
    code = main(["export", "--store", str(store.root), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_store_folder_loads_through_its_card(built, tmp_path):
    import datasets

    store, record = built
    folder = (store.root / record["path"]).parent
    ds = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.to_list() == pq.read_table(folder / "part-0.parquet").to_pylist()


def test_parquet_export_is_self_contained_and_its_card_parses(built, tmp_path, capsys):
    import datasets
    from huggingface_hub import DatasetCard

    store, record = built
    code, out, err = export(capsys, store, "--dataset", record["dataset_id"], "--to", str(tmp_path / "out"))
    assert code == 0 and err == "" and "load_dataset" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "part-0.parquet"]
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tmp_path / "out", moved)  # relative data files: the folder loads wherever it is
    ds = datasets.load_dataset(str(moved), split="train", cache_dir=str(tmp_path / "cache"))
    source = pq.read_table(store.root / record["path"])
    assert ds.to_list() == source.to_pylist() and len(ds) == 24

    card = DatasetCard.load(moved / "README.md")
    assert card.data.license == "cc-by-4.0" and card.data.size_categories == ["n<1K"]
    assert card.data.configs == [{"config_name": "default", "data_files": [{"split": "train", "path": "part-*.parquet"}]}]
    features = datasets.Features._from_yaml_list(card.data.dataset_info["features"])
    assert features == ds.features == datasets.Features.from_arrow_schema(source.schema)
    assert card.data.dataset_info["splits"][0]["num_examples"] == 24
    bond = card.data.bond
    anchor = store.anchor(0)
    rm = store.query("SELECT rm_id, rm_hash, spec FROM reward_models").to_pylist()[0]
    assert (bond["anchor_hash"], bond["anchor_path"]) == (anchor["anchor_hash"], anchor["anchor_path"])
    assert (bond["rm_id"], bond["rm_hash"], bond["rm_spec"]) == (rm["rm_id"], rm["rm_hash"], rm["spec"])
    assert (bond["n"], bond["k_min"], bond["k_max"], bond["weighting"], bond["target"], bond["round"]) == (
        2, 4, 4, "unbiased", "anchor", 0)
    assert bond["store"] == str(store.root) and bond["backends"] == ["transformers"]
    assert [{k: s[k] for k in ("max_new_tokens", "temperature", "top_p")} for s in bond["sampling"]] == [
        {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0}]
    assert bond["sampling"] == store.sampling_settings(0)  # precision too
    assert bond["tokenizer"]["name_or_path"] == anchor["anchor_path"]
    assert bond["tokenizer"]["special_tokens"]["eos_token"] == "<eos>"
    assert 'load_dataset("path/to/this/folder", split="train")' in card.text
    assert str(store.root) not in card.text.split("## Load it")[1]  # the load snippet is relative


def test_messages_are_a_list_of_role_content(built, tmp_path, capsys):
    import datasets

    store, record = built
    assert export(capsys, store, "--dataset", record["dataset_id"], "--to", str(tmp_path / "out"))[0] == 0
    ds = datasets.load_dataset(str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "cache"))
    chats = [r["messages"] for r in ds if r["messages"] is not None]
    assert len(chats) == 4 and all(m == [{"role": "system", "content": "sort letters"},
                                         {"role": "user", "content": "kite"}] for m in chats)
    assert ds.features["messages"] == datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})


def test_arrow_export_loads_from_disk_with_a_license_override(built, tmp_path, capsys):
    import datasets
    from huggingface_hub import DatasetCard

    store, record = built
    code, out, err = export(capsys, store, "--dataset", record["dataset_id"], "--to", str(tmp_path / "out"),
                            "--format", "arrow", "--license", "apache-2.0")
    assert code == 0 and "load_from_disk" in out
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert ds.to_list() == pq.read_table(store.root / record["path"]).to_pylist()
    card = DatasetCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == ds.info.license == "apache-2.0"
    assert card.data.configs[0]["data_files"][0]["path"] == "data-*.arrow" and "load_from_disk" in card.text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left beside it
    assert "cc-by-4.0" in (store.root / record["path"]).with_name("README.md").read_text()  # the store's card unchanged


@pytest.mark.parametrize("case", ["unknown id", "non-empty folder", "a file", "inside the store", "bad license",
                                  "bad format"])
def test_export_refusals_are_one_line_and_write_nothing(built, tmp_path, capsys, case):
    store, record = built
    dest = tmp_path / "out"
    args = ["--dataset", record["dataset_id"], "--to", str(dest)]
    if case == "unknown id":
        args[1] = "n2-nope"
    elif case == "non-empty folder":
        dest.mkdir()
        (dest / "mine.txt").write_text("keep me")
    elif case == "a file":
        dest.write_text("keep me")
    elif case == "inside the store":
        args[3] = str(store.root / "exported")
    elif case == "bad license":
        args += ["--license", "Not A License"]
    before_store, before_tmp = tree_digest(store.root), tree_digest(tmp_path)
    if case == "bad format":
        with pytest.raises(SystemExit) as e:  # argparse: one error: line and exit code 2
            main(["export", "--store", str(store.root), *args, "--format", "csv"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith("error: bond export: argument --format: invalid choice: 'csv'"), err
        return
    code, out, err = export(capsys, store, *args)
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    expected = {"unknown id": "has no dataset 'n2-nope'", "non-empty folder": "not an empty folder",
                "a file": "not an empty folder", "inside the store": "inside the store",
                "bad license": "--license: field 'license'"}[case]
    assert expected in err
    assert tree_digest(store.root) == before_store and tree_digest(tmp_path) == before_tmp


def test_an_empty_destination_folder_is_used(built, tmp_path, capsys):
    store, record = built
    (tmp_path / "out").mkdir()
    assert export(capsys, store, "--dataset", record["dataset_id"], "--to", str(tmp_path / "out"))[0] == 0
    assert (tmp_path / "out" / "part-0.parquet").is_file()


# ---- the README's TRL recipe ------------------------------------------------------------------
def readme_recipe() -> tuple[str, str]:
    """The README's two TRL blocks: the trainer class, and its use."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    (trainer,) = [b for b in blocks if "class BondSFTTrainer" in b]
    (usage,) = [b for b in blocks if "BondSFTTrainer(" in b and "class " not in b]
    return trainer, usage


def naive_weighted_loss(model, examples) -> float:
    """-(1/B) sum_i w_i sum_t log pi(y_t | ...) over each example's completion tokens, one at a time."""
    import torch

    total = 0.0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            nll = -sum(logp[t - 1, e["input_ids"][t]].item() for t in range(1, len(e["input_ids"]))
                       if e["labels"][t] != -100)
            total += e["bon_weight"] * nll
    return total / len(examples)


@pytest.mark.slow  # TRL's import, dataset preparation and a few optimizer steps (about 20 s here)
def test_the_readme_trl_recipe_weights_the_loss_and_plain_sft_does_not(built, untrained_model, tmp_path, capsys):
    pytest.importorskip("trl")
    import torch
    from trl import SFTConfig, SFTTrainer

    store, record = built
    data_dir = tmp_path / "bond-n2"
    assert export(capsys, store, "--dataset", record["dataset_id"], "--to", str(data_dir))[0] == 0
    trainer_src, usage = readme_recipe()
    run_args = ('max_steps=2, per_device_train_batch_size=8, report_to="none", save_strategy="no", '
                f'logging_steps=1, output_dir={str(tmp_path / "sft")!r}, remove_unused_columns=False')
    for old, new in (('"bond-n2"', repr(str(data_dir))), ('"demo-store/anchors/round=1"', repr(str(untrained_model))),
                     ('output_dir="sft-bond", remove_unused_columns=False, num_train_epochs=1', run_args)):
        assert old in usage, f"the README's recipe changed: {old} is gone"
        usage = usage.replace(old, new)
    scope: dict = {}
    exec(trainer_src, scope)
    exec(usage.replace("trainer.train()", ""), scope)
    trainer = scope["trainer"]

    rows = sorted(trainer.train_dataset, key=lambda r: (-r["bon_weight"], r["input_ids"]))
    batch_rows = rows[:4] + rows[-4:]  # the heaviest and the lightest: weights that differ
    assert len({r["bon_weight"] for r in batch_rows}) > 1
    batch = trainer.data_collator(batch_rows)
    model = trainer.model.eval()
    weighted = trainer.compute_loss(model, dict(batch)).item()
    assert weighted == pytest.approx(naive_weighted_loss(model, batch_rows), rel=1e-5)
    uniform = naive_weighted_loss(model, [{**r, "bon_weight": 1.0} for r in batch_rows])
    assert not math.isclose(weighted, uniform, rel_tol=1e-3)  # the weights change the loss

    # Plain SFTTrainer: bon_weight never reaches the loss; zeroing every weight changes nothing.
    def plain_loss(ds) -> float:
        plain = SFTTrainer(model=model, processing_class=trainer.processing_class, train_dataset=ds,
                           args=SFTConfig(output_dir=str(tmp_path / "plain"), report_to="none", use_cpu=True,
                                          per_device_train_batch_size=8))
        (b,) = [next(iter(plain.get_train_dataloader()))]
        assert "bon_weight" not in b
        with torch.no_grad():
            return plain.compute_loss(model, b).item()

    ds = scope["ds"]
    assert plain_loss(ds) == plain_loss(ds.map(lambda r: {"bon_weight": 0.0}))

    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
