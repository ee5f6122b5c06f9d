// Package mappings is the control plane: volumes, FlashCopy mappings and consistency groups, the pure state machine of their states, the driver that carries out its effects, and the persistent catalogue.
package mappings
