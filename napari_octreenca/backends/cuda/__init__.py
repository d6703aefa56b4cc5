"""The fused CUDA backend: NVRTC compilation of ``kernels/`` (``nvrtc``) and the launcher (``backend``)."""
