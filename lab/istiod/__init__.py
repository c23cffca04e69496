"""istiod"""
