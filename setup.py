from setuptools import find_packages, setup

setup(
    name="s4rec",
    version="0.1.0",
    description="S4Rec sequential recommendation with fused Triton kernels for clustering, "
    "contrastive and full-item softmax losses",
    packages=find_packages(include=["s4rec", "s4rec.*", "s4rec_kernels", "s4rec_kernels.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", "scikit-learn"],
        "kmeans": ["scikit-learn"],
        "report": ["matplotlib"],
        "tensorboard": ["tensorboard"],
    },
)
