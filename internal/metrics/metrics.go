// Package metrics exposes what operators watch as Prometheus metrics: per mapping, its progress,
// grains copied, split-on-write count, bytes copied and copy throughput, read from the control
// plane at each scrape (no second bookkeeping that could drift). The copy counters are the
// mapping's totals over all its runs, which the control plane keeps (persisted as each run
// ends), so they never go down while the daemon runs: not when a copy completes and the
// mapping leaves the engine, nor when it starts again.
package metrics

import (
	"context"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"fcnbd/internal/api"
)

// Source is what the collector reads at each scrape.
type Source interface {
	Fcmaps(ctx context.Context) []api.Fcmap
}

var (
	labels     = []string{"fcmap", "source", "target"}
	progress   = prometheus.NewDesc("fcnbd_fcmap_progress_percent", "Share of grains the mapping's target holds.", labels, nil)
	grains     = prometheus.NewDesc("fcnbd_fcmap_grains_copied_total", "Grains copied by background copy or cleaning, over every run of the mapping.", labels, nil)
	splitWrite = prometheus.NewDesc("fcnbd_fcmap_split_on_write_total", "Grains split by host writes (copy-on-write), over every run of the mapping.", labels, nil)
	bytesCopy  = prometheus.NewDesc("fcnbd_fcmap_copied_bytes_total", "Bytes copied into the target, over every run of the mapping.", labels, nil)
	throughput = prometheus.NewDesc("fcnbd_fcmap_copy_throughput_bytes", "Copy throughput over the last seconds, bytes/s.", labels, nil)
	status     = prometheus.NewDesc("fcnbd_fcmap_status", "1 for the mapping's current status.", append(labels, "status"), nil)
)

// Collector is the per-mapping metrics of src, read at each collection.
func Collector(src Source) prometheus.Collector { return collector{src} }

type collector struct{ src Source }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{progress, grains, splitWrite, bytesCopy, throughput, status} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	for _, m := range c.src.Fcmaps(context.Background()) {
		l := []string{m.Name, m.SourceName, m.TargetName}
		ch <- prometheus.MustNewConstMetric(progress, prometheus.GaugeValue, float64(m.Progress), l...)
		ch <- prometheus.MustNewConstMetric(grains, prometheus.CounterValue, float64(m.GrainsCopiedTotal), l...)
		ch <- prometheus.MustNewConstMetric(splitWrite, prometheus.CounterValue, float64(m.SplitOnWriteTotal), l...)
		ch <- prometheus.MustNewConstMetric(bytesCopy, prometheus.CounterValue, float64(m.BytesCopiedTotal), l...)
		ch <- prometheus.MustNewConstMetric(throughput, prometheus.GaugeValue, float64(m.CopyThroughput), l...)
		ch <- prometheus.MustNewConstMetric(status, prometheus.GaugeValue, 1, append(l, m.Status)...)
	}
}

// Handler serves the metrics of src, plus the Go runtime's and the process's.
func Handler(src Source) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(Collector(src), collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}
