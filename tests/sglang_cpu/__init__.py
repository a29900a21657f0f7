"""The real sglang 0.5.23 on a CPU: its ``Engine`` with a CPU scheduler process, a tiny Qwen3, and its environment.

- ``environment``: builds ``.venv-sglang`` (sglang ``--no-deps`` plus ``requirements.txt``).
- ``scheduler`` and ``engine``: ``sglang.Engine`` with ``run_scheduler_process_func``
  replaced; what is replaced and what is not is in ``scheduler``'s docstring.
- ``model``: the random-weight Qwen3 model with Qwen's tokenizer, and the
  vectors a worker must return for it.
- ``torchvision_unavailable``: the import-time replacement for torchvision,
  whose PyPI wheel links CUDA libraries the CPU torch lacks; sglang imports it
  for image models only.

The one part that cannot run here at all is SGLang's own scheduler: it loads
the model through CUDA kernels (``sglang-kernel``, ``flashinfer``) that have no
CPU build.
"""
