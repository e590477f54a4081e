// Package crds pulls Prometheus Operator's API packages into this module so
// controller-gen (a tool of this module) can generate their CRDs from the Go
// types: `go tool controller-gen crd paths=<api package> output:crd:dir=...`.
package crds

import (
	_ "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	_ "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1alpha1"
)
