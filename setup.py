from setuptools import find_packages, setup

setup(
    name="megakto",
    version="0.1.0",
    description="KTO (Kahneman-Tversky Optimization) training at DeepSpeed scale: ZeRO-3 policy, "
    "offloaded reference, packed KL pairs, all-reduced KL baseline.",
    packages=find_packages(include=["megakto", "megakto.*"]),
    python_requires=">=3.11",
    install_requires=[
        # The floors the results depend on; megakto/distributed/ds_config.py says why for each and checks
        # them at start-up (check_versions). The suite runs torch 2.13, deepspeed 0.19.8, transformers 5.25.
        "torch>=2.4,<2.15",
        "deepspeed>=0.19.8",  # AutoTP under ZeRO-3 with a vocabulary-parallel head (MIN_DEEPSPEED_TP)
        "transformers>=5.0",  # position-id packed masks, dtype=, the pipeline stages' masking_utils
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "accelerate>=1.1.0",  # transformers needs it to load a model under ZeRO-3
        "pyyaml>=6.0",
        "packaging>=20.0",  # deepspeed version checks
        "tqdm>=4.60",
        "matplotlib>=3.7",  # tools/plot_run.py: pictures of a finished run
        "peft>=0.13",  # model.lora: adapters, the reference as the adapters switched off
    ],
    extras_require={"test": ["pytest>=8.0", "pytest-timeout>=2.3"]},
)
