"""ONNX Runtime execution providers and sessions.

``cpu`` runs on ``CPUExecutionProvider``; ``cuda`` on ``CUDAExecutionProvider`` (the
``gpu`` extra installs onnxruntime-gpu); ``auto`` picks CUDA when it is available and a GPU
is present, else the CPU. A request for CUDA that cannot be met falls back to the CPU with
a warning that says why, so a result is never silently attributed to the wrong device.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings

from fairdeploy.errors import FairDeployError, first_line

__all__ = ["PROVIDERS", "make_session", "resolve_providers", "session_provider"]

#: Values the ``--provider`` option accepts.
PROVIDERS = ("auto", "cpu", "cuda")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def resolve_providers(provider: str) -> list[str]:
    """ONNX Runtime provider list for ``auto``, ``cpu`` or ``cuda``.

    ``cuda`` without ``CUDAExecutionProvider`` in this onnxruntime build warns and returns
    the CPU provider; ``auto`` falls back silently.
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise FairDeployError(
            f"--provider {provider!r} is unknown: use one of {', '.join(PROVIDERS)}"
        )
    if provider == "cpu":
        return [_CPU]
    if _CUDA in ort.get_available_providers():
        return [_CUDA, _CPU]
    if provider == "cuda":
        warnings.warn(
            "CUDAExecutionProvider is not available in this onnxruntime build: running on the "
            "CPU. Install the gpu extra (pip uninstall onnxruntime && pip install "
            "'fairdeploy[gpu]') on a machine with an NVIDIA GPU to use --provider cuda",
            UserWarning,
            stacklevel=2,
        )
    return [_CPU]


def make_session(
    model: str | os.PathLike[str] | bytes,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    spinning: bool = False,
):
    """An ``onnxruntime.InferenceSession`` on the requested provider.

    Parameters
    ----------
    model : path-like or bytes
        The ONNX model.
    provider : {"auto", "cpu", "cuda"}
        See :func:`resolve_providers`.
    threads : int, optional
        Intra-op threads (ONNX Runtime's default, one per physical core, when None).
    spinning : bool
        Let worker threads spin after a run. Off by default: spinning threads steal cores
        from other sessions timed in the same process (an 8× ratio read as 3× here).
    """
    import onnxruntime as ort

    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise FairDeployError(f"--threads {threads!r} is not allowed: use an integer ≥ 1")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    providers = resolve_providers(provider)
    src = model if isinstance(model, bytes) else os.fspath(model)
    if not isinstance(model, bytes) and not os.path.isfile(src):
        raise FairDeployError(f"ONNX model {src!r} does not exist: give a .onnx file")
    try:
        # ORT prints an "EP Error ... falling back" banner to stdout before retrying a
        # model it cannot load: the error below says it in one line instead.
        with contextlib.redirect_stdout(io.StringIO()):
            sess = ort.InferenceSession(src, opts, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/... types
        what = "the model" if isinstance(model, bytes) else repr(src)
        raise FairDeployError(
            f"{what} cannot be loaded by ONNX Runtime ({type(exc).__name__}: {first_line(exc)}): "
            "give a .onnx file written by fairdeploy optimize or export_onnx"
        ) from None
    if providers[0] == _CUDA and session_provider(sess) != _CUDA:
        # onnxruntime-gpu lists CUDA even without a usable GPU, then runs on the CPU.
        warnings.warn(
            "CUDAExecutionProvider could not be initialised (no GPU or CUDA libraries "
            "missing): running on the CPU",
            UserWarning,
            stacklevel=2,
        )
    return sess


def session_provider(session) -> str:
    """The provider a session actually runs on (its first active provider)."""
    return str(session.get_providers()[0])
