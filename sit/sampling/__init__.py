"""What sample.py and sample_ddp.py stand on, one concern a module:

- `families`: the sampler families (`SAMPLER_FAMILIES`: modes, flag groups, folder parts, record fields);
- `flags`: their command line (the shared flags, the mode first, the likelihood options);
- `settings`: `SamplingConfig` from the flags, `ModelSettings` from it and the checkpoint;
- `presets`: published evaluations as `--preset` flag sets, merged into the flags before the config;
- `loading`: the model and VAE (rank 0 first in a job), compiled on request;
- `folder`: sample folder names, PNGs and the streamed .npz;
- `images`: every missing PNG of a folder, sampled by all ranks (sit.generation.generate_blocks);
- `batch_record`: the record beside the .npz (files hashed, NFE measured; sit.record.SampleRecord);
- `likelihood`: log-likelihoods of latent and pixel-space models, one path.
"""
