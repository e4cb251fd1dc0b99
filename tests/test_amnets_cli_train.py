"""amnets train: exact resume (temperature, steps, weights), validation with best.pt / last.pt / averaged.pt,
the configuration and parameter counts first, log lines through tqdm, log.csv."""

import csv
import json

import pytest
import torch

import amnets.cli
from amnets.cli import build_model, defaults, main, parameter_counts, temperature
from test_amnets_cli import TINY_MODEL, corpus  # noqa: F401  (corpus: the module's fixture)


def log_rows(directory) -> list[dict]:
    with open(directory / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_continues_the_temperature_schedule_and_steps_exactly(corpus, tmp_path, capsys):  # noqa: F811
    common = ["--data", corpus] + TINY_MODEL
    # A run stopped at step 3 of 6 and resumed equals the run that was never stopped: steps, temperatures,
    # losses (the Gumbel noise is seeded per step) and weights.
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    assert main(["train", "--steps", "3", "--anneal-steps", "6", "--checkpoint-dir", str(stopped)]
                + common) == 0
    assert main(["train", "--resume", str(stopped / "last.pt"), "--steps", "6"] + common) == 0
    assert main(["train", "--steps", "6", "--checkpoint-dir", str(whole)] + common) == 0
    capsys.readouterr()
    a, b = log_rows(stopped), log_rows(whole)
    assert [r["step"] for r in a] == [r["step"] for r in b] == ["1", "2", "3", "4", "5", "6"]
    for key in ("tau", "loss", "full_fraction", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    cfg = dict(defaults(), tau0=2.0, tau_min=0.5, steps=6)
    assert [float(r["tau"]) for r in a] == pytest.approx([temperature(cfg, s) for s in range(6)], rel=1e-5)
    last_a, last_b = load(stopped / "last.pt"), load(whole / "last.pt")
    assert last_a["step"] == last_b["step"] == 6 and last_a["config"]["anneal_steps"] == 6
    for name, value in last_a["model"].items():
        assert torch.equal(value, last_b["model"][name]), name

    # The case: a finished run extended with --resume. The schedule ended at tau_min and stays
    # there; it used to be recomputed over the new --steps and jump back up (0.5 -> 0.545).
    assert main(["train", "--resume", str(whole / "last.pt"), "--steps", "8"] + common) == 0
    logged = [line.split() for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line[1] for line in logged] == ["7", "8"]  # the step count carries on
    assert [float(r["tau"]) for r in log_rows(whole)] == pytest.approx(
        [temperature(cfg, s) for s in range(6)] + [0.5, 0.5], rel=1e-5)
    assert load(whole / "last.pt")["step"] == 8


def test_old_checkpoints_resume_on_their_own_schedule(corpus, tmp_path, capsys):  # noqa: F811
    ckpt = tmp_path / "ck"
    common = ["--data", corpus, "--checkpoint-dir", str(ckpt)] + TINY_MODEL
    assert main(["train", "--steps", "2"] + common) == 0
    old = load(ckpt / "last.pt")
    del old["config"]["anneal_steps"]  # as written before anneal_steps existed
    torch.save(old, ckpt / "old.pt")
    assert main(["train", "--resume", str(ckpt / "old.pt"), "--steps", "3"] + common) == 0
    assert float(log_rows(ckpt)[-1]["tau"]) == pytest.approx(0.5)


def test_validation_keeps_best_last_and_the_average_of_the_last_k(corpus, tmp_path, capsys):  # noqa: F811
    ckpt = tmp_path / "ck"
    assert main(["train", "--data", corpus, "--eval-data", corpus, "--checkpoint-dir", str(ckpt), "--steps",
                 "4", "--eval-every", "2", "--checkpoint-every", "1", "--average-last", "2", "--log-every",
                 "3"] + TINY_MODEL[:-2]) == 0  # TINY_MODEL without its --log-every 1
    err = capsys.readouterr().err
    names = sorted(p.name for p in ckpt.iterdir())  # step-1.pt and step-2.pt pruned: only the last 2 kept
    assert names == ["averaged.pt", "best.pt", "config.json", "last.pt", "log.csv", "step-3.pt", "step-4.pt"]
    rows = log_rows(ckpt)
    assert [r["step"] for r in rows] == ["2", "3", "4"]  # validated at 2 and 4, logged at 3 and 4 (the end)
    assert [bool(r["val_wer"]) for r in rows] == [True, False, True] and rows[1]["loss"]
    validated = [r for r in rows if r["val_wer"]]
    best_row = min(validated, key=lambda r: (float(r["val_wer"]), float(r["val_cer"])))
    best = load(ckpt / "best.pt")
    assert best["step"] == int(best_row["step"])
    assert best["best"]["cer"] == pytest.approx(float(best_row["val_cer"]), rel=1e-5)
    last = load(ckpt / "last.pt")
    assert last["step"] == 4 and last["best"] == best["best"]
    steps = [load(ckpt / f"step-{s}.pt")["model"] for s in (3, 4)]
    averaged = load(ckpt / "averaged.pt")
    assert averaged["averaged_from"] == ["step-3.pt", "step-4.pt"] and "optimizer" not in averaged
    for name, value in averaged["model"].items():
        want = (steps[0][name] + steps[1][name]) / 2 if value.is_floating_point() else steps[1][name]
        torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7)
    assert "validation: WER" in err and "averaged.pt: the mean of step-3.pt, step-4.pt" in err
    # eval takes the averaged model
    assert main(["eval", str(ckpt / "averaged.pt"), "--out", str(tmp_path / "ev")]) == 0


def test_config_and_parameter_counts_come_first_and_lines_go_through_tqdm(
        corpus, tmp_path, capsys, monkeypatch):  # noqa: F811
    written = []
    real_write = amnets.cli.tqdm.write
    monkeypatch.setattr(amnets.cli.tqdm, "write", lambda s, **kw: written.append(s) or real_write(s, **kw))
    ckpt = tmp_path / "ck"
    assert main(["train", "--data", corpus, "--checkpoint-dir", str(ckpt), "--steps", "2"] + TINY_MODEL) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "amnets train: config" and "hidden_size=32" in " ".join(err[1:6])
    model = build_model(load(ckpt / "last.pt")["config"], 29)
    counts = parameter_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    count_line = next(i for i, line in enumerate(err) if "parameters (" in line)
    assert f"amnets train: {counts['total']:,} parameters" in err[count_line]
    assert count_line < next(i for i, line in enumerate(err) if line.startswith("step "))
    assert [w.split()[1] for w in written if w.startswith("step ")] == ["1", "2"]  # through tqdm.write
    saved = json.loads((ckpt / "config.json").read_text())
    # anneal_steps as given (0: each run's own --steps), not this run's horizon: a later run of another
    # length from this file anneals over its own steps
    assert saved["hidden_size"] == 32 and saved["anneal_steps"] == 0 and load(ckpt / "last.pt")["config"][
        "anneal_steps"] == 2
    # config.json is a --config file for another run
    assert main(["train", "--config", str(ckpt / "config.json"), "--steps", "1", "--checkpoint-dir",
                 str(tmp_path / "again")]) == 0


def test_a_new_run_refuses_a_directory_holding_another_runs_numbered_checkpoints(
        corpus, tmp_path, capsys):  # noqa: F811
    # The probe's case: a second, shorter run into the same directory pruned its own step-1.pt and step-2.pt
    # (the old run's numbers were higher) and wrote averaged.pt as the mean of the old run's step-5/step-6.
    ckpt = tmp_path / "ck"
    common = ["--data", corpus, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--average-last",
              "2"] + TINY_MODEL
    assert main(["train", "--steps", "3", "--seed", "1"] + common) == 0
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    capsys.readouterr()
    assert main(["train", "--steps", "2", "--seed", "2"] + common) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(
        f"amnets train: error: --checkpoint-dir {ckpt} holds step-<N>.pt checkpoints of another run "
        f"(step-2.pt, step-3.pt)")
    assert f"--resume {ckpt / 'last.pt'}, or choose another --checkpoint-dir" in err
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # nothing pruned, averaged, rewritten
    # --resume still continues that run: its own step-N.pt pruned and averaged
    assert main(["train", "--resume", str(ckpt / "last.pt"), "--steps", "4"] + common) == 0
    assert load(ckpt / "averaged.pt")["averaged_from"] == ["step-3.pt", "step-4.pt"]


def test_a_one_step_horizon_is_at_tau_min_from_step_0():
    cfg = dict(defaults(), tau0=2.0, tau_min=0.5)
    assert [temperature(dict(cfg, steps=1), s) for s in (0, 1)] == [0.5, 0.5]
    assert [temperature(dict(cfg, steps=6, anneal_steps=1), s) for s in (0, 3)] == [0.5, 0.5]
    assert temperature(dict(cfg, steps=2), 0) == 2.0 and temperature(dict(cfg, steps=2), 1) == 0.5


def test_resume_continues_beside_the_checkpoint_given_not_where_it_was_written(
        corpus, tmp_path, capsys):  # noqa: F811
    """A copied (or moved) run resumed from its copy writes into the copy; the original stays as it was (it
    used to be overwritten: the checkpoint's recorded --checkpoint-dir was used)."""
    import shutil

    orig, copy = tmp_path / "orig", tmp_path / "copy"
    common = ["--data", corpus, "--checkpoint-every", "1", "--average-last", "2"] + TINY_MODEL
    assert main(["train", "--steps", "2", "--checkpoint-dir", str(orig)] + common) == 0
    shutil.copytree(orig, copy)
    before = {p.name: p.read_bytes() for p in orig.iterdir()}
    capsys.readouterr()
    assert main(["train", "--resume", str(copy / "last.pt"), "--steps", "3"] + common) == 0
    assert f"writing to {copy}" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in orig.iterdir()} == before
    assert load(copy / "last.pt")["step"] == 3 and load(copy / "averaged.pt")["averaged_from"] == [
        "step-2.pt", "step-3.pt"]
    # Resumed into a third directory holding another run's step-N.pt: refused, as a new run would be.
    assert main(["train", "--resume", str(copy / "last.pt"), "--steps", "4", "--checkpoint-dir", str(orig)]
                + common) == 2
    assert "holds step-<N>.pt checkpoints of another run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in orig.iterdir()} == before


def test_a_resumed_run_keeps_a_better_best_pt_written_after_its_checkpoint(corpus, tmp_path, capsys):  # noqa: F811
    """Killed after best.pt was written at a step past last.pt's: the resumed run redoes those steps and must not
    replace the better model by a worse one (last.pt's record predates it). Validation on other data starts
    the record afresh: WERs on different data do not compare."""
    ckpt = tmp_path / "ck"
    common = ["--data", corpus, "--eval-data", corpus, "--eval-every", "1", "--checkpoint-dir", str(ckpt)] \
        + TINY_MODEL
    assert main(["train", "--steps", "2", "--checkpoint-every", "2"] + common) == 0
    best = load(ckpt / "best.pt")
    best["best"] = dict(best["best"], wer=0.0, cer=0.0, step=3)  # as if step 3 had validated perfectly
    torch.save(best, ckpt / "best.pt")
    kept = (ckpt / "best.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(ckpt / "last.pt"), "--steps", "4", "--checkpoint-every", "2"]
                + common) == 0
    assert (ckpt / "best.pt").read_bytes() == kept and "best: WER 0.0000 at step 3" in capsys.readouterr().err
    other = tmp_path / "other_eval"  # the same utterances at another path: other data, as far as the run knows
    import shutil
    shutil.copytree(corpus, other)
    assert main(["train", "--resume", str(ckpt / "last.pt"), "--steps", "5", "--checkpoint-every", "1"]
                + common[:2] + ["--eval-data", str(other)] + common[4:]) == 0
    assert load(ckpt / "best.pt")["best"]["step"] == 5  # the first validation on the new data is the best so far


def test_a_new_run_refuses_a_directory_holding_another_runs_last_and_best(
        corpus, tmp_path, capsys):  # noqa: F811
    # Only step-N.pt were guarded: a second run silently replaced the first one's last.pt and best.pt.
    ckpt = tmp_path / "ck"
    common = ["--data", corpus, "--eval-data", corpus, "--checkpoint-dir", str(ckpt)] + TINY_MODEL
    assert main(["train", "--steps", "1", "--seed", "1"] + common) == 0
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    capsys.readouterr()
    assert main(["train", "--steps", "1", "--seed", "2"] + common) == 2
    assert capsys.readouterr().err == (
        f"amnets train: error: --checkpoint-dir {ckpt} holds another run's last.pt, best.pt, which this run "
        f"would overwrite; continue that run with --resume {ckpt / 'last.pt'}, or choose another "
        "--checkpoint-dir\n")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    lone = tmp_path / "lone"  # another run's per-rank checkpoint alone (--save-every-rank) was not guarded
    lone.mkdir()
    (lone / "last.rank1.pt").write_bytes(before["last.pt"])
    assert main(["train", "--steps", "1"] + common[:4] + ["--checkpoint-dir", str(lone)] + TINY_MODEL) == 2
    assert f"--checkpoint-dir {lone} holds another run's last.rank1.pt" in capsys.readouterr().err


def test_a_resume_on_another_number_of_processes_says_what_changes(corpus, tmp_path, capsys):  # noqa: F811
    """It continued without a word (the global batch and the data order change); the checkpoint now records
    the process count."""
    ckpt = tmp_path / "ck"
    common = ["--data", corpus, "--checkpoint-dir", str(ckpt)] + TINY_MODEL
    assert main(["train", "--steps", "1"] + common) == 0
    last = load(ckpt / "last.pt")
    assert last["world"] == 1
    capsys.readouterr()
    assert main(["train", "--resume", str(ckpt / "last.pt"), "--steps", "2"] + common) == 0
    assert "process(es)" not in capsys.readouterr().err  # the same count: nothing to say
    torch.save(dict(last, world=2), ckpt / "last.pt")  # as written by a 2-process run
    assert main(["train", "--resume", str(ckpt / "last.pt"), "--steps", "2"] + common) == 0
    assert (f"amnets train: note: {ckpt / 'last.pt'} was trained on 2 process(es), this run on 1: the global "
            "batch becomes 1 x batch_size") in capsys.readouterr().err


def test_resume_refuses_steps_below_the_checkpoints(corpus, tmp_path, capsys):  # noqa: F811
    # Was "nothing to train", config.json rewritten with the lower --steps, and `{}` printed.
    ckpt = tmp_path / "ck"
    assert main(["train", "--steps", "3", "--data", corpus, "--checkpoint-dir", str(ckpt)] + TINY_MODEL) == 0
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    capsys.readouterr()
    assert main(["train", "--resume", str(ckpt / "last.pt"), "--steps", "2"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == (
        f"amnets train: error: --resume {ckpt / 'last.pt'} is at step 3, past --steps 2 (the steps in all, "
        "not more steps); give --steps above 3 to train on\n")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
