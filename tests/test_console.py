"""Known third-party warnings filtered; progress as a bar on a terminal, as log lines elsewhere."""
import warnings

from pcdet_ext.utils import console


def test_known_warnings_filtered_others_kept():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_known_warnings()
        warnings.warn("'pin_memory' argument is set as true but no accelerator is found, then ...", UserWarning)
        warnings.warn("torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument.")
        warnings.warn("`torch.cuda.amp.autocast(args...)` is deprecated. Please use ...", FutureWarning)
        warnings.warn("something a user should see", UserWarning)
    assert [str(w.message) for w in caught] == ["something a user should see"]
    import logging
    assert logging.getLogger("torch.fx._symbolic_trace").getEffectiveLevel() == logging.ERROR


def test_a_redirected_log_gets_progress_lines_not_a_bar(capsys, monkeypatch):
    """pytest captures stderr: not a terminal. The loop still reports iterations, rate, ETA and its postfix
    (here the loss) as whole lines, never carriage-return redraws; other ranks print nothing."""
    monkeypatch.setenv(console.PROGRESS_SECONDS, "0")
    bar = console.progress(range(4), desc="epoch 1")
    for i in bar:
        bar.set_postfix(loss=f"{1.0 / (i + 1):.3f}")
    lines = capsys.readouterr().err.splitlines()
    assert lines and "\r" not in "".join(lines) and lines[-1].startswith("epoch 1: 100%")
    assert "4/4" in lines[-1] and "it/s" in lines[-1] and "loss=0.250" in lines[-1]
    assert any("<" in line for line in lines)  # elapsed<remaining: the ETA
    quiet = console.progress(range(3), main=False)
    assert quiet.disable and list(quiet) == [0, 1, 2] and capsys.readouterr().err == ""
    monkeypatch.setenv(console.PROGRESS_SECONDS, "3600")  # the default cadence: start and end lines only
    list(console.progress(range(50), desc="eval"))
    assert len(capsys.readouterr().err.splitlines()) <= 3


def test_error_messages_carry_no_stray_quotes():
    from pcdet_ext.utils.console import message
    assert message(KeyError("dataset.dir: /x is not a directory")) == "dataset.dir: /x is not a directory"
    assert message(ValueError("a 'quoted' word")) == "a 'quoted' word" and message(KeyError()) == ""
