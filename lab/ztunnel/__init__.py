"""ztunnel"""
