"""Install the three packages of the framework: ``pretrain``, ``data_prep`` and ``launch``.

Install editable (``pip install -e '.[dev]'``): the hydra configs live in the top-level
``conf/`` folder of the checkout, which the entry points find relative to their package.
"""
from setuptools import find_packages, setup

# Pinned together: torch 2.14.1 needs triton 3.8.0; deepspeed 0.19.8 and timm 1.0.31 were tested
# against it on CPU (gloo) in this repository's CI.
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "triton==3.8.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
    "deepspeed==0.19.8",
    "webdataset==1.0.2",
    "timm==1.0.31",
    "sentencepiece==0.2.3",
    "wandb==0.31.0",
    "hydra-core==1.3.8",
    "omegaconf==2.3.1",
    "safetensors==0.8.0",
    "pyarrow==26.0.1",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    # data_prep: downloads, language id (model ships in the wheel), perceptual hashes
    "requests==2.34.2",
    "py3langid==0.4.0",
    "imagehash==4.3.2",
    "scipy==1.17.1",
    "pywavelets==1.9.0",
    # data_prep.storage: s3:// through s3fs (its aiohttp also serves http(s)://); gs:// needs gcsfs
    "s3fs==2026.9.0",
]

EXTRAS_REQUIRE = {
    "dev": [
        "pytest==9.2.0",
        "pytest-timeout==2.4.0",
        "psutil==7.2.2",  # bench/: process-tree memory
        "hypothesis==6.170.15",  # fuzzing the readers and text filters
        "moto[server]==5.2.6",  # a real S3-API server on 127.0.0.1 for the object-storage tests
    ],
    "gcs": ["gcsfs"],  # gs:// datasets
}

setup(
    name="clipforge",
    version="0.1.0",
    description="Distributed contrastive image-text pretraining: dataset builder, DeepSpeed trainer, launchers",
    python_requires=">=3.10",
    packages=find_packages(include=["pretrain*", "data_prep*", "launch*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "clip-train=pretrain.train:main",
            "clip-prep=data_prep.__main__:main",
            "clip-launch=launch.__main__:main",
        ]
    },
)
