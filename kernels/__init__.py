"""Triton kernels (shipped as fastchat_ft.kernels), each with a plain torch reference that is also
the CPU path. One kernel per file: jit functions, launchers, autograd Function, reference."""
