"""dsv4cli.train"""
