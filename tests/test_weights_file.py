"""The one safe loader of weights files (binaryduo.models.weights_file): plain tensors load, a
file that would run code on loading is refused naming the file, a truncated one is unreadable;
the trainer's checkpoint errors are these (checkpoints, teachers and exports share the rule)."""
import collections
import pickle

import pytest
import torch

from binaryduo.models.weights_file import (UnreadableWeightsError, UntrustedWeightsError,
                                           load_weights)


class RunsCode:
    def __reduce__(self):  # what unpickling would call: print("pwned")
        return (print, ("pwned",))


def test_a_state_dict_loads_on_the_cpu(tmp_path):
    state = collections.OrderedDict(w=torch.arange(6.0).reshape(2, 3), n=torch.tensor(3))
    torch.save(state, tmp_path / "model_state.pt")
    loaded = load_weights(tmp_path / "model_state.pt")
    assert list(loaded) == ["w", "n"] and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "payload": RunsCode()}, path)
    with pytest.raises(UntrustedWeightsError, match=r"evil\.pt: refusing to load: .*print"):
        load_weights(path)
    assert "pwned" not in capsys.readouterr().out


def test_a_truncated_file_is_unreadable_and_a_missing_one_not_found(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UnreadableWeightsError, match=r"cut\.pt: unreadable"):
        load_weights(path)
    (tmp_path / "junk.pt").write_bytes(pickle.dumps([1, 2])[:3])
    with pytest.raises(UnreadableWeightsError):
        load_weights(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.pt")


def test_the_trainers_checkpoint_errors_are_the_loaders():
    from binaryduo.trainer.run import checkpoint
    assert checkpoint.load_model_state is load_weights
    assert checkpoint.UntrustedCheckpointError is UntrustedWeightsError
    assert checkpoint.CheckpointCorruptError is UnreadableWeightsError
