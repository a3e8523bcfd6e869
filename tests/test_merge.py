import pytest
import torch
from conftest import assert_user_error, run_cli

from nanoalign import hub, merge
from nanoalign.checkpoint import load_checkpoint, save_checkpoint
from nanoalign.cli import UserError, parse_cli
from nanoalign.merge import merge_linear, merge_task_arithmetic, slerp


def merge_main(argv):
    return merge.main(parse_cli(merge.Config, argv))


def _state(seed):
    model, _ = hub.load("tiny", seed=seed)
    return model.state_dict()


def test_linear_merge_of_identical_models_is_identity():
    s = _state(0)
    merged = merge_linear([s, s, s], [0.2, 0.3, 0.5])
    for k in s:
        torch.testing.assert_close(merged[k], s[k], rtol=0, atol=1e-7)


def test_linear_merge_hand_worked():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    assert merge_linear([a, b], [1.0, 3.0])["w"].tolist() == [2.5, 5.0]  # (1·a + 3·b) / 4


def test_slerp_endpoints_and_midpoint():
    a, b = _state(0), _state(1)
    for k in a:
        assert torch.equal(slerp(a[k], b[k], 0.0), a[k]) and torch.equal(slerp(a[k], b[k], 1.0), b[k])
    # orthogonal unit vectors: the midpoint stays on the unit circle (lerp would shrink it to 1/√2)
    mid = slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    torch.testing.assert_close(mid, torch.tensor([2 ** -0.5, 2 ** -0.5]))
    # parallel vectors fall back to linear interpolation instead of dividing 0 by 0
    assert slerp(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0]), 0.5).tolist() == [2.0, 2.0]
    assert slerp(torch.zeros(3), torch.ones(3), 0.25).tolist() == [0.25] * 3


def test_task_arithmetic_weight_zero_is_base_and_one_is_model():
    base, a, b = _state(0), _state(1), _state(2)
    zero = merge_task_arithmetic(base, [a, b], [0.0, 0.0])
    one = merge_task_arithmetic(base, [a], [1.0])
    for k in base:
        assert torch.equal(zero[k], base[k])
        torch.testing.assert_close(one[k], a[k], rtol=0, atol=1e-7)


def test_cli_writes_a_loadable_checkpoint(tmp_path):
    paths = []
    for seed in (0, 1):
        model, tok = hub.load("tiny", seed=seed)
        save_checkpoint(str(tmp_path / f"m{seed}"), model, tok)
        paths.append(str(tmp_path / f"m{seed}"))
    out = tmp_path / "merged"
    r = run_cli(["-m", "nanoalign.merge", "--models", *paths, "--weights", "0.5", "0.5", "--method", "linear",
                 "--out", str(out)])
    assert r.returncode == 0, r.stderr
    merged, _ = load_checkpoint(str(out))
    a, b = hub.load("tiny", seed=0)[0].state_dict(), hub.load("tiny", seed=1)[0].state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, (a[k] + b[k]) / 2)
    assert_user_error(run_cli(["-m", "nanoalign.merge", "--models", *paths, "--method", "task-arithmetic",
                               "--out", str(tmp_path / "x")]), "--base")
    merge_main(["--models", *paths, "--weights", "0.25", "--method", "slerp", "--out", str(tmp_path / "s")])
    merge_main(["--models", paths[1], "--weights", "0.5", "--method", "task-arithmetic", "--base", paths[0],
                "--out", str(tmp_path / "t")])
    s, t = (load_checkpoint(str(tmp_path / d))[0].state_dict() for d in "st")
    for k in a:
        torch.testing.assert_close(s[k], slerp(a[k], b[k], 0.25), rtol=0, atol=1e-7)
        torch.testing.assert_close(t[k], (a[k] + b[k]) / 2, rtol=0, atol=1e-6)  # a + 0.5 (b - a)
    for argv, needle in [(["--models", paths[0], "--weights", "0.5", "--method", "slerp"], "slerp"),
                         (["--models", *paths, "--weights", "1"], "--weights"),
                         (["--models", *paths, "--weights", "1", "half"], "--weights: not a number"),
                         (["--models", *paths, "--weights", "nan", "1"], "finite"),
                         (["--models", *paths, "--method", "ties"], "--method"),
                         (["--models", paths[0], str(tmp_path / "nope")], "nope")]:
        with pytest.raises(UserError, match=needle):
            merge_main([*argv, "--out", str(tmp_path / "x")])
    model, tok = hub.load("small")  # another architecture
    save_checkpoint(str(tmp_path / "small"), model, tok)
    with pytest.raises(UserError, match="architecture differs"):
        merge_main(["--models", paths[0], str(tmp_path / "small"), "--out", str(tmp_path / "x")])
