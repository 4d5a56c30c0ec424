"""Training data: image folders with the ADM crop (`images`), cached VAE latents (`features`) and a
data order that an interrupted run resumes exactly (`order`)."""
