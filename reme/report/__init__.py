"""What a user looks at: colour overlays and legends (`viz`), crops of reference segments
(`crops`), evidence contact sheets (`contact_sheet`) and the reference-set report (`inspect`)."""
