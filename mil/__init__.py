"""pathmil.mil: dual-level multiple-instance learning over the tile store."""
