// The etcd server binary: the same entry point as upstream's go.etcd.io/etcd/v3
// main package, built against go.etcd.io/etcd/server/v3 at the version in go.mod.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
