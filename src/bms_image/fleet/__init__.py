"""The provisioner: the simulated fleet of bare-metal servers, deployed from
images it reads over gRPC."""
