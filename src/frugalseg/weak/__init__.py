"""Weak supervision: from image tags to pixel labels, as plain functions and small modules.

    classify   the tag classifier's data, spec, save/load and AP/F1      cam        CAM, multi-scale + flip
    advcam     anti-adversarial climbing (+ advcam_reference, the oracle)  prm        peak response maps
    group      group-wise co-attention: groups, crops, group_maps          methods    MAP_METHODS, SEED_METHODS
    maps_io    one .npz of maps per image                                  seeds      seeds, seed mIoU, sweeps
    crf        dense-CRF pseudo-masks                                      mining     MCOF's bottom-up mining
    saliency   manifold-ranking saliency and the Bayesian merge

Nothing here knows run directories, configs, Lightning or the CLI: the stages that chain these into
`frugalseg classify / cams / run` are `frugalseg.stages.classify`, `.maps`, `.group` and `.pipeline`.
This file imports nothing, so `frugalseg.weak.crf` loads without torch in the CRF's worker processes.
"""
