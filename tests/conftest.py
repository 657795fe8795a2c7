import os

import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors. The flag is read when a
# kernel is decorated, so it must be set before anything imports ops/.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
