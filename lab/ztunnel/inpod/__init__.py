"""inpod"""
