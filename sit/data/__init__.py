"""Training data: image folders with the ADM crop (`images`), cached VAE latents (`features`: the format
and the dataset; `extraction`: writing them) and a data order that an interrupted run resumes exactly (`order`)."""
