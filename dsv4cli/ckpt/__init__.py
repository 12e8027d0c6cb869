"""dsv4cli.ckpt"""
