"""`lpl estimate / curriculum / position-map` implementations on a real recording."""

from __future__ import annotations

import json
import warnings
import shutil

import pytest
import wandb
import torch

from lpl.order.commands import (
    check_methods_main, curriculum_main, estimate_main, position_map_main, read_orders, sensitivity_main,
)
from lpl.utils.errors import LplError
from test_estimator_task import NUM_BATCHES, record


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    return record(tmp_path_factory.mktemp("cli") / "rec", lr=0.003, proj_dim=256, curvature_rank=0)


def test_estimate_random_and_file(recording, tmp_path):
    assert estimate_main(["--recording", str(recording), "--orders", "random:5", "--method", "adam",
                          "--out", str(tmp_path / "a")]) == 0
    written = json.loads((tmp_path / "a" / "estimates.json").read_text())
    assert len(written["estimates"]) == 5 and len(written["estimates"][0]["loss_curve"]) == NUM_BATCHES + 1
    assert (tmp_path / "a" / "estimates.csv").read_text().count("\n") == 6
    assert (tmp_path / "a" / "curves.png").stat().st_size > 1000
    orders = tmp_path / "orders.txt"
    orders.write_text("0 1 2 3 4 5 6 7 8 9\n9,8,7,6,5,4,3,2,1,0\n")
    estimate_main(["--recording", str(recording), "--orders", str(orders), "--method", "adam",
                   "--out", str(tmp_path / "b")])
    first = json.loads((tmp_path / "b" / "estimates.json").read_text())["estimates"][0]
    assert first["final_loss"] == pytest.approx(written["reference_loss"], abs=1e-6)
    # the estimates.csv it writes is an orders file: its order column
    again = read_orders(str(tmp_path / "a" / "estimates.csv"), range(NUM_BATCHES))
    assert again.tolist() == [row["order"] for row in written["estimates"]]


def test_shorter_orders_are_compared_with_the_reference_after_as_many_steps(recording, tmp_path, capsys):
    from lpl.order import Recording
    from lpl.order.checking import reference_loss_after

    prefix = Recording.open(recording).order[:4]
    (tmp_path / "orders.json").write_text(json.dumps([prefix]))
    estimate_main(["--recording", str(recording), "--orders", str(tmp_path / "orders.json"), "--method", "adam",
                   "--out", str(tmp_path / "out")])
    written = json.loads((tmp_path / "out" / "estimates.json").read_text())
    after = reference_loss_after(Recording.open(recording), 4)
    assert written["reference_loss"] == pytest.approx(after)
    assert written["estimates"][0]["final_loss"] == pytest.approx(after, abs=1e-6)  # the reference's own prefix
    assert "(after 4 steps)" in capsys.readouterr().out


@pytest.mark.parametrize("argument, message", [(["--batch-size", "0"], "must be at least 1"),
                                               (["--out", "FILE/sub"], "is a file, not a folder"),
                                               (["--out", "LONG"], "File name too long"),
                                               # a folder no one can create in (as root too)
                                               (["--out", "/proc/nope"], "argument --out: '/proc/nope'")])
def test_bad_arguments_stop_before_any_work(recording, tmp_path, capsys, argument, message):
    (tmp_path / "FILE").write_text("")
    argument = [a.replace("FILE", str(tmp_path / "FILE")).replace("LONG", str(tmp_path / ("x" * 300)))
                for a in argument]
    arguments = {"--recording": str(recording), "--orders": "random:2", "--out": str(tmp_path / "out")}
    arguments.update(dict(zip(argument[::2], argument[1::2])))
    with pytest.raises(SystemExit) as exit_info:
        estimate_main([item for pair in arguments.items() for item in pair])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("main, extra", [(estimate_main, ["--orders", "random:4"]), (curriculum_main, []),
                                         (position_map_main, []), (check_methods_main, [])])
def test_a_wrong_recording_is_refused_before_out_is_created(tmp_path, main, extra):
    (tmp_path / "empty").mkdir()
    for recording in (tmp_path / "nonexistent", tmp_path / "empty"):
        with pytest.raises(LplError, match=f"{recording} holds no recording"):
            main(["--recording", str(recording), "--out", str(tmp_path / "out" / "sub"), *extra])
    assert not (tmp_path / "out").exists()


def test_a_damaged_pool_file_is_named_not_blamed_on_the_orders(recording, tmp_path):
    """random:N reads the pool's order before the estimator's load verifies the files: a flipped byte there was
    refused as "an order names batch id 70368744177687"."""
    damaged = tmp_path / "rec"
    shutil.copytree(recording, damaged)
    pool = damaged / "pool.safetensors"
    data = bytearray(pool.read_bytes())
    data[-5] ^= 0x40
    pool.write_bytes(bytes(data))
    with pytest.raises(LplError, match="pool.safetensors is corrupted"):
        estimate_main(["--recording", str(damaged), "--orders", "random:2", "--method", "adam",
                       "--out", str(tmp_path / "out")])


def test_a_refused_command_leaves_no_out_folder_it_created(recording, tmp_path):
    out = tmp_path / "out" / "sub"
    with pytest.raises(LplError, match="curvature_rank"):  # the method lacks its data: refused after --out exists
        estimate_main(["--recording", str(recording), "--orders", "random:2", "--method", "first_order",
                       "--out", str(out)])
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()  # a folder the user made stays
    with pytest.raises(LplError, match="curvature_rank"):
        estimate_main(["--recording", str(recording), "--orders", "random:2", "--method", "first_order",
                       "--out", str(tmp_path / "kept")])
    assert (tmp_path / "kept").is_dir()


def test_curriculum_verify_prints_the_retrained_loss(recording, tmp_path, capsys):
    curriculum_main(["--recording", str(recording), "--method", "adam", "--budget", "16", "--population", "8",
                     "--search", "local", "--verify", "--out", str(tmp_path)])
    best = json.loads((tmp_path / "best_order.json").read_text())
    assert f"retrained {best['retrained_loss']:.4f}" in capsys.readouterr().out


def test_curriculum_and_position_map(recording, tmp_path):
    curriculum_main(["--recording", str(recording), "--method", "adam", "--budget", "128", "--population", "16",
                     "--out", str(tmp_path)])
    best = json.loads((tmp_path / "best_order.json").read_text())
    assert sorted(best["order"]) == list(range(NUM_BATCHES)) and best["estimated_loss"] <= best["history"][0]
    position_map_main(["--recording", str(recording), "--method", "adam", "--batches", "0,3", "--out", str(tmp_path)])
    lines = (tmp_path / "position_map.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[1].startswith("0,") and len(lines[1].split(",")) == NUM_BATCHES + 1
    assert (tmp_path / "position_map.png").exists()
    with pytest.raises(LplError, match="names a batch twice"):
        position_map_main(["--recording", str(recording), "--method", "adam", "--batches", "1,1",
                           "--out", str(tmp_path)])


def test_bad_orders(recording, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[0, 1, 99]]))
    with pytest.raises(LplError, match="batch id 99"):
        estimate_main(["--recording", str(recording), "--orders", str(bad), "--method", "adam", "--out", str(tmp_path)])
    with pytest.raises(LplError, match="neither random:N nor a file"):
        read_orders("nothing_here.json", range(10))
    ragged = tmp_path / "ragged.json"
    ragged.write_text(json.dumps([[0, 1], [0]]))
    with pytest.raises(LplError, match="same length"):
        read_orders(str(ragged), range(10))
    with pytest.raises(LplError, match="curvature_rank"):
        estimate_main(["--recording", str(recording), "--orders", "random:2", "--method", "first_order",
                       "--out", str(tmp_path)])
    with pytest.raises(LplError, match="not a device"):
        estimate_main(["--recording", str(recording), "--orders", "random:2", "--method", "adam", "--out",
                       str(tmp_path), "--device", "gpu0"])
    if not torch.cuda.is_available():
        with pytest.raises(LplError, match="no CUDA GPU"):
            estimate_main(["--recording", str(recording), "--orders", "random:2", "--method", "adam", "--out",
                           str(tmp_path), "--device", "cuda"])


@pytest.mark.parametrize("content, expected", [
    (b"5", [[5]]),                                   # a bare number: one order of one batch
    (b"[2, 0, 1]", [[2, 0, 1]]),                    # a flat JSON list: one order, as the same ids as text are
    (b"index,final_loss,order\n0,2.31,2 0 1\n1,2.30,1 0 2\n", [[2, 0, 1], [1, 0, 2]]),  # estimates.csv
    (b"\xef\xbb\xbf[[2, 0, 1]]", [[2, 0, 1]]),     # JSON behind a byte-order mark
    (b"2, 0, 1\r\n1 0 2\r\n", [[2, 0, 1], [1, 0, 2]]),
])
def test_order_files_in_the_forms_editors_write(tmp_path, content, expected):
    path = tmp_path / "orders.txt"
    path.write_bytes(content)
    assert read_orders(str(path), range(3)).tolist() == expected


@pytest.mark.parametrize("content, match", [
    (b"[[true, false, true]]", "batch ids"),
    (b"[[1.5, 2]]", "batch ids"),
    (b"[[18446744073709551616, 1]]", "batch ids"),
    ("[[1, 2]]".encode("utf-16"), "not UTF-8"),
    (b'{"orders": [[1, 2]]}', "holds a JSON object without an \"order\" list"),
])
def test_order_files_that_are_not_orders_are_refused_clearly(tmp_path, content, match):
    path = tmp_path / "orders.txt"
    path.write_bytes(content)
    with pytest.raises(LplError, match=match):
        read_orders(str(path), range(3))


@pytest.mark.parametrize("name, content, match", [
    ("orders.json", b"[[9, 8, 7]", r"orders.json is not valid JSON \(Expecting ',' delimiter at line 1, column 11\)"),
    ("orders.json", b"9 8 7", r"not valid JSON \(Extra data at line 1, column 3\)"),
    ("orders.txt", b"[[9, 8], \n [7, 6]]]", r"not valid JSON \(Extra data at line 2, column 9\)"),
    ("orders.json", b"[[2, -1, 0]]", r"order 1 names batch id -1 at position 2"),
    ("orders.txt", b"0 1 2\n2,-1,0\n", r"order 2 names batch id -1 at position 2"),
    ("orders.csv", b"method,spearman\nadam,0.9\n", r"orders.csv, line 1: 'method,spearman' is not a list of integer "
                                                    r"batch ids.*estimates.csv"),
])
def test_malformed_json_and_negative_ids_are_named(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LplError, match=match):
        read_orders(str(path), range(3))


def test_local_curriculum_search_takes_a_budget_below_the_genetic_population(recording, tmp_path):
    curriculum_main(["--recording", str(recording), "--method", "adam", "--search", "local", "--budget", "1",
                     "--out", str(tmp_path)])
    best = json.loads((tmp_path / "best_order.json").read_text())
    assert best["evaluations"] == 1 and sorted(best["order"]) == list(range(NUM_BATCHES))
    # the file is an --orders file of lpl estimate as it is (it was refused as "a JSON object")
    assert read_orders(str(tmp_path / "best_order.json"), range(NUM_BATCHES)).tolist() == [best["order"]]


def test_random_orders_permute_the_reference_and_are_bounded():
    reference = [3, 1, 1, 0, 2]
    orders = read_orders("random:50", reference, seed=1)
    assert orders.shape == (50, 5) and all(sorted(o) == sorted(reference) for o in orders.tolist())
    assert len({tuple(o) for o in orders.tolist()}) > 10
    assert torch.equal(orders, read_orders("random:50", reference, seed=1))
    with pytest.raises(LplError, match="between 1 and"):
        read_orders("random:1000000000", reference)


def test_sensitivity_then_adjoint_estimates(recording, tmp_path, capsys):
    path = shutil.copytree(recording, tmp_path / "rec")
    assert sensitivity_main(["--recording", str(path), "--curvature-rank", "2", "--accelerator", "cpu"]) == 0
    printed = capsys.readouterr().out  # the built-in retraining check and the self-replay, for both methods
    assert "check on 2 retrained orders: linearized misses by" in printed and "adjoint misses by" in printed
    assert "replays to itself within" in printed
    estimate_main(["--recording", str(path), "--orders", "random:3", "--method", "adjoint",
                   "--out", str(tmp_path / "a")])
    written = json.loads((tmp_path / "a" / "estimates.json").read_text())
    finals = [e["final_loss"] for e in written["estimates"]]
    assert (len(finals) == 3 and len(set(finals)) == 3
            and all(f == e["loss_curve"][-1] for f, e in zip(finals, written["estimates"])))
    with pytest.raises(SystemExit):  # argparse refuses a rank that is not a number
        sensitivity_main(["--recording", str(path), "--curvature-rank", "x"])
    with pytest.raises(LplError, match="curvature_rank"):
        sensitivity_main(["--recording", str(path), "--curvature-rank", "-1"])
    with pytest.raises(LplError, match="hessian_rank"):
        sensitivity_main(["--recording", str(path), "--hessian-rank", "-1"])
    estimate_main(["--recording", str(path), "--orders", "random:2", "--method", "linearized",
                   "--out", str(tmp_path / "b")])
    written = json.loads((tmp_path / "b" / "estimates.json").read_text())
    assert len(written["estimates"]) == 2 and len(written["estimates"][0]["loss_curve"]) == NUM_BATCHES + 1


def test_sensitivity_refuses_linearized_data_too_large_to_store(recording, tmp_path, monkeypatch):
    monkeypatch.setattr("lpl.order.adjoint.LINEARIZED_MAX_BYTES", 1000)
    with pytest.raises(LplError, match="hessian_rank=0"):
        sensitivity_main(["--recording", str(recording), "--accelerator", "cpu"])
    assert not (recording / "sensitivity.safetensors").exists()  # refused before writing anything


def test_wandb_option_logs_the_curves_and_the_heatmap(recording, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.finish()  # a run an earlier test left open would take these logs (WandbLogger reuses it)
    estimate_main(["--recording", str(recording), "--orders", "random:3", "--method", "adam", "--out",
                   str(tmp_path / "e"), "--wandb", "lpl-tests"])
    assert list((tmp_path / "e" / "wandb").glob("offline-run-*/files/media/table/estimate/adam/loss_curves*.json"))
    position_map_main(["--recording", str(recording), "--method", "adam", "--batches", "0,3", "--out",
                       str(tmp_path / "p"), "--wandb", "lpl-tests"])
    assert list((tmp_path / "p" / "wandb").glob("offline-run-*/files/media/images/order/position_map*.png"))


def test_seed_and_wandb_mode_are_checked_when_the_arguments_are_parsed(tmp_path, monkeypatch, capsys):
    from lpl.order.commands import estimate_main

    with pytest.raises(SystemExit):
        estimate_main(["--recording", str(tmp_path), "--orders", "random:2", "--seed", str(2**70),
                       "--out", str(tmp_path / "out")])
    assert "must be below 2**64" in capsys.readouterr().err
    monkeypatch.setenv("WANDB_MODE", "ofline")
    with pytest.raises(SystemExit):
        estimate_main(["--recording", str(tmp_path), "--orders", "random:2", "--wandb", "proj",
                       "--out", str(tmp_path / "out")])
    assert "did you mean 'offline'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_best_order_found_for_another_recording_is_read_with_a_warning(tmp_path):
    """Its ids name the other run's pool batches (read silently before)."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    path = tmp_path / "best_order.json"
    path.write_text(json.dumps({"recording": str(there), "order": [2, 0, 1]}))
    with pytest.warns(UserWarning, match="found for the recording .*there, not .*here"):
        assert read_orders(str(path), range(3), recording=here).tolist() == [[2, 0, 1]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_orders(str(path), range(3), recording=there).tolist() == [[2, 0, 1]]
