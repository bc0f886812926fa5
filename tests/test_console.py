"""Known third-party warnings filtered; progress bars only on a terminal."""
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


def test_progress_bar_off_when_stderr_is_not_a_terminal(capsys):
    bar = console.progress(range(3), desc="x")  # pytest captures stderr: not a terminal
    assert bar.disable and list(bar) == [0, 1, 2]
    assert console.progress(range(3), main=False).disable
