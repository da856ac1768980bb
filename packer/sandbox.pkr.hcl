# One environment's sandbox container image: a Debian release with its python3, the
# environment's hash-locked wheels and the sandbox package, provisioned by
# ansible/sandbox.yml. `make sandbox-image` runs it once per environment with the stage
# `stockade images stage` wrote, then `stockade images import-rootfs` checks the exported
# rootfs against the lock, shifts it into the containers' uid range, and `stockade images
# export` archives it.
# Changed this recipe? Bump IMAGE_FORMAT in src/stockade/runner/manager/images.py: the
# image's name (its digest) must change with it, or no host gets the new one.

variable "stage" {
  type        = string
  description = "Directory `stockade images stage` wrote (wheels, sandbox sources)."
}

variable "output" {
  type        = string
  description = "Directory the rootfs.tar.gz is exported to (must not exist)."
}

variable "suite" {
  type        = string
  description = "The Debian release the environment runs (its environment.toml's suite)."
  default     = "bookworm"
}

variable "container_name" {
  type    = string
  default = "stockade-packer-sandbox"
}

source "lxc" "sandbox" {
  # Packer 1.6.6 only copies config_file into its output: create_options is what makes
  # lxc-create apply it (else the container gets /etc/lxc/default.conf and its bridge).
  config_file         = "${path.root}/sandbox-build.conf"
  create_options      = ["-f", "${path.root}/sandbox-build.conf"]
  template_name       = "debian"
  template_parameters = ["-r", var.suite, "--packages=python3,catatonit"]
  output_directory    = var.output
  container_name      = var.container_name
  init_timeout        = "120s"
}

build {
  sources = ["source.lxc.sandbox"]

  provisioner "shell" {
    script          = "${path.root}/scripts/check-build-container"
    execute_command = "chmod +x {{ .Path }}; {{ .Path }} /usr/bin/python3 /usr/bin/catatonit --netless"
  }

  # Packer's ssh proxy hangs with the lxc builder: Ansible attaches to the container itself.
  provisioner "ansible" {
    playbook_file = "${path.root}/../ansible/sandbox.yml"
    extra_arguments = [
      "-c", "community.general.lxc",
      "-e", "ansible_host=${var.container_name}",
      "-e", "sandbox_stage=${var.stage}",
    ]
  }
}
