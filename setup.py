"""lo_tf: learned optimizers in TensorFlow 2 (Metz et al., 'Understanding and correcting
pathologies in the training of learned optimizers')."""

from setuptools import find_packages
from setuptools import setup

setup(
    name='lo_tf',
    version='0.1.0',
    description='Learned optimizers trained with the merged reparameterization + ES estimator.',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['lo_tf', 'lo_tf.*']),
    package_data={'lo_tf': ['pretrained/*.json', 'pretrained/*.npz']},
    python_requires='>=3.10',
    install_requires=[
        # The plain wheel runs on CPU; GPU users install tensorflow[and-cuda] on top.
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
