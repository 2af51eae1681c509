// goload: an independent etcd v3 load generator on etcd's own Go client (clientv3 + grpc-go),
// to cross-check keel-bench's figures. Built by scripts/cross-check.sh from Debian's packaged
// Go sources (golang-etcd-server-dev), with no download.
//
// Usage: goload -endpoint 127.0.0.1:2379 -conns 100 -clients 1000 -total 100000 -val-size 256
package main

import (
	"context"
	"flag"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/clientv3"
)

func main() {
	endpoint := flag.String("endpoint", "127.0.0.1:2379", "gRPC endpoint")
	conns := flag.Int("conns", 1, "connections")
	clients := flag.Int("clients", 1, "concurrent clients, sharing the connections")
	total := flag.Int64("total", 10000, "puts")
	valSize := flag.Int("val-size", 256, "value bytes")
	flag.Parse()

	cs := make([]*clientv3.Client, *conns)
	for i := range cs {
		c, err := clientv3.New(clientv3.Config{Endpoints: []string{*endpoint}, DialTimeout: 5 * time.Second})
		if err != nil {
			panic(err)
		}
		cs[i] = c
	}
	val := strings.Repeat("v", *valSize)
	var issued int64
	lat := make([][]time.Duration, *clients)
	var errs int64
	var wg sync.WaitGroup
	start := time.Now()
	for c := 0; c < *clients; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			kv := cs[c%len(cs)]
			key := []byte{0, 0, 0, 0, 0, 0, 0, 0}
			for atomic.AddInt64(&issued, 1) <= *total {
				t := time.Now()
				if _, err := kv.Put(context.Background(), string(key), val); err != nil {
					atomic.AddInt64(&errs, 1)
					continue
				}
				lat[c] = append(lat[c], time.Since(t))
			}
		}(c)
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	q := func(f float64) float64 { return float64(all[int(float64(len(all)-1)*f)].Microseconds()) / 1000 }
	fmt.Printf("{\"requests\":%d,\"errors\":%d,\"requests_per_sec\":%.1f,\"p50_ms\":%.3f,\"p99_ms\":%.3f}\n",
		len(all), errs, float64(len(all))/secs, q(0.5), q(0.99))
}
