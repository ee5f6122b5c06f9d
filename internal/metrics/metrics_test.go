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
		GrainsCopied: 7, SplitOnWrite: 3, BytesCopied: 2621440, CopyThroughput: 1000}}
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
