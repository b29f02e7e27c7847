"""The one compiled piece of pakar: pakar/_int8step.c, the int8 decode step (pakar/quant.py's Int8Step).

Optional: where no C compiler is found (e.g. Windows without Visual Studio's build tools), the
install goes on without it and `--quantize int8` decodes through PyTorch ops instead (slower, same
results; pakar says so once when it quantises). Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """Compile for the CPU installing it (-march=native: the int8 products use its widest vector
    instructions, e.g. AVX-512 VNNI); where the compiler refuses that flag, compile portable code."""

    def build_extension(self, ext):
        if self.compiler.compiler_type == "msvc":
            ext.extra_compile_args = ["/O2"]
            return super().build_extension(ext)
        try:
            ext.extra_compile_args = ["-O3", "-march=native"]
            return super().build_extension(ext)
        except Exception:  # noqa: BLE001 - any compiler failure: retry without the CPU-specific flag
            ext.extra_compile_args = ["-O3"]
            return super().build_extension(ext)


setup(
    ext_modules=[Extension("pakar._int8step", ["pakar/_int8step.c"], optional=True)],
    cmdclass={"build_ext": BuildExt},
)
