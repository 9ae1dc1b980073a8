"""The KVM guest's decoders built natively: the fuzzer and the differential tests."""
