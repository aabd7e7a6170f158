cmdline --hda test.img --cdrom install.iso --boot d -m 2048
