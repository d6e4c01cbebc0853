"""lo_tf: learned optimizers in TensorFlow 2 (Metz et al., 'Understanding and correcting
pathologies in the training of learned optimizers').

Building also compiles the fused learned-optimizer op (lo_tf/kernels, paper App. F) with the flags of
the TensorFlow found at build time (pyproject.toml puts TensorFlow into pip's build environment;
third_party/tf_custom_op/ holds the build steps). Without a C++ compiler, or when the compile fails,
the install still succeeds and lo_tf uses its XLA path instead.
"""

import os
import shutil
import sys

from setuptools import Extension
from setuptools import find_packages
from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'third_party',
                                'tf_custom_op'))
import build_kernels  # pylint: disable=g-import-not-at-top,wrong-import-position

_KERNELS = 'lo_tf/kernels'
_HEADERS = [f'{_KERNELS}/mlp_lopt.h', f'{_KERNELS}/mlp_lopt_kernel.h']


class BuildKernels(build_ext):
  """Builds both op libraries with `build_kernels.build` and records the build in
  build_info.json beside them (also when nothing could be built)."""

  def build_extensions(self):
    out_dir = os.path.dirname(self.get_ext_fullpath(f'lo_tf.kernels.{build_kernels.CPU_LIBRARY}'))
    suffix = self.get_ext_filename(build_kernels.CPU_LIBRARY)[len(build_kernels.CPU_LIBRARY):]
    info = build_kernels.build(out_dir, suffix=suffix, log=self.announce_line)
    self._info = build_kernels.write_info(out_dir, info)

  def announce_line(self, line):
    self.announce(line, level=2)

  def _info_pair(self):
    """(build_info.json in the build directory, its place in the source tree)."""
    build_py = self.get_finalized_command('build_py')
    regular = os.path.join(self.build_lib, *_KERNELS.split('/'), build_kernels.INFO_NAME)
    return regular, os.path.join(build_py.get_package_dir('lo_tf.kernels'),
                                 build_kernels.INFO_NAME)

  def copy_extensions_to_source(self):
    super().copy_extensions_to_source()
    regular, inplace = self._info_pair()
    shutil.copyfile(regular, inplace)

  def get_outputs(self):
    return super().get_outputs() + [self._info_pair()[1 if self.inplace else 0]]

  def get_output_mapping(self):
    mapping = super().get_output_mapping()
    if self.inplace:
      mapping.update([self._info_pair()])
    return mapping


setup(
    name='lo_tf',
    version='0.1.0',
    description='Learned optimizers trained with the merged reparameterization + ES estimator.',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['lo_tf', 'lo_tf.*']),
    package_data={'lo_tf': ['pretrained/*.json', 'pretrained/*.npz']},
    # Both libraries are optional: BuildKernels builds what it can (see build_info.json).
    ext_modules=[
        Extension(f'lo_tf.kernels.{build_kernels.CPU_LIBRARY}', optional=True, depends=_HEADERS,
                  sources=[f'{_KERNELS}/mlp_lopt_ops.cc', f'{_KERNELS}/mlp_lopt_cpu.cc']),
        Extension(f'lo_tf.kernels.{build_kernels.GPU_LIBRARY}', optional=True, depends=_HEADERS,
                  sources=[f'{_KERNELS}/mlp_lopt_gpu.cc', f'{_KERNELS}/mlp_lopt_cuda.cu']),
    ],
    cmdclass={'build_ext': BuildKernels},
    python_requires='>=3.10',
    install_requires=[
        # The plain wheel runs on CPU; GPU users install tensorflow[and-cuda] on top. Keep the
        # TensorFlow range in step with pyproject.toml's build requirement.
        'tensorflow>=2.16,<2.22',
        'tensorboard>=2.16,<3',  # tf.summary needs it; recent TF wheels no longer pull it in
        'tensorflow-datasets>=4.9,<5',
        'numpy>=1.26,<3',
        'absl-py>=2.0,<3',
        'gin-config>=0.5,<0.6',
        'scikit-learn>=1.3,<2',
        'matplotlib>=3.8,<4',
    ],
    extras_require={'test': ['pytest>=7,<10']},
)
