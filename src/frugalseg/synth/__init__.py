"""Synthetic training pairs: a mask → image conditional GAN and a generative model of the masks themselves.

- `conditioning`: what the generator and discriminator are conditioned on (one-hot classes + the boundary
  map of instances, pix2pixHD's answer to touching objects of one class).
- `cgan`: the losses (LSGAN or vanilla adversarial, L1, discriminator feature matching) and sampling.
- `masks`: a shape model of the cells and nuclei of the training masks (PCA of signed distance maps) that
  draws new layouts, and how novel they are (IoU with the nearest training mask).
- `frechet`: Fréchet distance between two image sets in a backbone's pooled feature space.

Plain functions and modules; the training loop, run directory and CLI are in `frugalseg.stages.synth`.
"""

from frugalseg.synth.cgan import discriminator_loss, generator_loss, render
from frugalseg.synth.conditioning import boundary_map, condition, instance_map
from frugalseg.synth.masks import ShapeModel, nearest_mask_iou

__all__ = ["ShapeModel", "boundary_map", "condition", "discriminator_loss", "generator_loss", "instance_map",
           "nearest_mask_iou", "render"]
