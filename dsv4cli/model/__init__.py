"""dsv4cli.model"""
