package metrics

import (
	"context"
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"fcnbd/internal/api"
)

type fake []api.Fcmap

func (f fake) Fcmaps(context.Context) []api.Fcmap { return f }

func TestMetricsShowEachMapping(t *testing.T) {
	src := fake{{Name: "snap", SourceName: "db", TargetName: "db_t", Status: "copying", Progress: 42,
		GrainsCopied: 2, SplitOnWrite: 1, BytesCopied: 1, CopyThroughput: 1000,
		GrainsCopiedTotal: 7, SplitOnWriteTotal: 3, BytesCopiedTotal: 2621440}}
	srv := httptest.NewServer(Handler(src))
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`fcnbd_fcmap_progress_percent{fcmap="snap",source="db",target="db_t"} 42`,
		`fcnbd_fcmap_grains_copied_total{fcmap="snap",source="db",target="db_t"} 7`,
		`fcnbd_fcmap_split_on_write_total{fcmap="snap",source="db",target="db_t"} 3`,
		`fcnbd_fcmap_copied_bytes_total{fcmap="snap",source="db",target="db_t"} 2.62144e+06`,
		`fcnbd_fcmap_copy_throughput_bytes{fcmap="snap",source="db",target="db_t"} 1000`,
		`fcnbd_fcmap_status{fcmap="snap",source="db",status="copying",target="db_t"} 1`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}
