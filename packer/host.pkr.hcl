# The stockade host image: Debian bookworm provisioned by ansible/image.yml (hardening,
# ssh, firewall, fail2ban, lxc_host, the prebuilt sandbox containers, runner, nginx).
#
# - source.lxc.host builds it here: a container from LXC's Debian template, provisioned
#   over lxc-attach, exported as rootfs.tar.gz, then made into a bootable qcow2 (kernel,
#   initramfs, GRUB on the MBR, fstab by UUID) by scripts/rootfs-to-qcow2.
#   `make image` runs it; `make image-test` boots the result.
# - source.amazon-ebs.host is the same provisioning on Debian's official bookworm AMI
#   (account 136693071363), for AWS. It cannot be built on the CI machines (no AWS);
#   `packer validate` checks it and the README says how to build it.

variable "wheelhouse" {
  type        = string
  description = "The runner's wheels `make dist` wrote (dist/wheelhouse)."
}

variable "sandbox_archives" {
  type        = list(string)
  description = "The environments' sandbox image archives `make dist` wrote (stockade-sandbox-<environment>-<digest>.tar.gz): the image carries and serves these environments."
}

variable "output" {
  type        = string
  description = "Directory for rootfs.tar.gz and stockade-host.qcow2 (must not exist)."
}

variable "version" {
  type        = string
  description = "stockade's version, stamped into /etc/stockade-release."
}

variable "commit" {
  type        = string
  description = "The git commit the image is built from (stamped; seeds the root fs UUID)."
}

variable "build_time" {
  type        = string
  description = "UTC build time, ISO 8601 (stamped)."
}

variable "container_name" {
  type    = string
  default = "stockade-packer-host"
}

variable "disk_size" {
  type        = string
  description = "Size of the qcow2's virtual disk (sparse)."
  default     = "8G"
}

variable "aws_region" {
  type    = string
  default = "eu-central-1"
}

variable "aws_instance_type" {
  type    = string
  default = "t3.medium"
}

locals {
  # Everything the roles install, plus what boots a VM: installed by the template while
  # it builds the rootfs, so the roles find them present.
  host_packages = join(",", [
    "python3", "python3-apt", "python3-packaging", "python3-venv", "python3-systemd",
    "openssh-server", "nftables", "fail2ban", "nginx-light",
    "lxc", "lxc-templates", "debootstrap", "uidmap", "apparmor",
    "iproute2", "procps", "sudo", "ifupdown", "isc-dhcp-client",
    "systemd-sysv", "udev", "linux-image-amd64", "grub-pc", "e2fsprogs", "zstd", "catatonit",
  ])
  ansible_vars = [
    "-e", "runner_wheelhouse=${var.wheelhouse}",
    "-e", jsonencode({ sandbox_images_archives = var.sandbox_archives }),
    "-e", "host_image_version=${var.version}",
    "-e", "host_image_commit=${var.commit}",
    "-e", "host_image_build_time=${var.build_time}",
  ]
}

source "lxc" "host" {
  # create_options applies the config (Packer 1.6.6 only copies config_file to the output).
  config_file               = "${path.root}/host-build.conf"
  create_options            = ["-f", "${path.root}/host-build.conf"]
  template_name             = "debian"
  template_parameters       = ["-r", "bookworm", "--packages=${local.host_packages}"]
  template_environment_vars = ["DEBIAN_FRONTEND=noninteractive"]
  output_directory          = var.output
  container_name            = var.container_name
  init_timeout              = "120s"
}

source "amazon-ebs" "host" {
  region        = var.aws_region
  instance_type = var.aws_instance_type
  ssh_username  = "admin"
  ami_name      = "stockade-host-${var.version}-${substr(var.commit, 0, 12)}-${formatdate("YYYYMMDDhhmmss", var.build_time)}"
  source_ami_filter {
    filters = {
      name                = "debian-12-amd64-*"
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["136693071363"]
    most_recent = true
  }
  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = 16
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 125
    delete_on_termination = true
  }
  tags = {
    Name            = "stockade-host"
    stockade_commit = var.commit
  }
}

build {
  sources = ["source.lxc.host", "source.amazon-ebs.host"]

  provisioner "shell" {
    only            = ["lxc.host"]
    script          = "${path.root}/scripts/check-build-container"
    execute_command = "chmod +x {{ .Path }}; {{ .Path }} /usr/bin/python3 /usr/bin/catatonit /usr/bin/lxc-start /usr/sbin/sshd --netless"
  }

  # Packer's ssh proxy hangs with the lxc builder: Ansible attaches to the container itself.
  provisioner "ansible" {
    only             = ["lxc.host"]
    playbook_file    = "${path.root}/../ansible/image.yml"
    ansible_env_vars = ["ANSIBLE_CONFIG=${path.root}/../ansible/ansible.cfg"]
    extra_arguments  = concat(["-c", "community.general.lxc", "-e", "ansible_host=${var.container_name}"], local.ansible_vars)
  }

  provisioner "ansible" {
    only             = ["amazon-ebs.host"]
    playbook_file    = "${path.root}/../ansible/image.yml"
    ansible_env_vars = ["ANSIBLE_CONFIG=${path.root}/../ansible/ansible.cfg"]
    user             = "admin"
    extra_arguments  = concat(["--become"], local.ansible_vars)
  }

  post-processor "shell-local" {
    only   = ["lxc.host"]
    inline = ["${path.root}/scripts/rootfs-to-qcow2 ${var.output}/rootfs.tar.gz ${var.output}/stockade-host.qcow2 ${var.disk_size} ${var.commit}"]
  }
}
