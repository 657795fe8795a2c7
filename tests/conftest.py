import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors. The flag is read when a
# kernel is decorated, so it must be set before anything imports ops/.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# Kernel calls are slow under the Triton interpreter and the first call compiles: no deadlines.
settings.register_profile(
    "memcompile", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("memcompile")


@pytest.fixture
def one_thread():
    """Run a test on one torch CPU thread: tiny ops spend their time waking threads, dreadfully
    so on a loaded shared CPU (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
