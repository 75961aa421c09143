"""tir-gym environments: importing this package registers every env id with Gymnasium."""
