"""The backends of disks: images (qemu-img), a profile's disks against the host, pools
(directories, LVM), snapshots, cloud-init seeds."""
