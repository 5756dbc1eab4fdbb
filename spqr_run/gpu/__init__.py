"""GPU kernels without a torch extension: the cubin build (`build`), NVRTC (`nvrtc`), the driver (`driver`),
where the kernels come from on this machine (`modules`) and the SpQR launcher (`spqr_matmul`).

Importing this package imports nothing else (setup.py loads `build.py` by path, without torch)."""
