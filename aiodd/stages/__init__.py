"""The four pipeline stages: guest reader → block windower → format encoder → file sink."""
