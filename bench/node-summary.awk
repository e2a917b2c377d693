# One line from a tessera-loadtest summary (report.txt): sends/s, send p99,
# deliveries/s, delivery p50/p99, syncs/s and the server's peak RSS, after
# the label `head`. Used by node-ab.sh and many-core.sh:
#   awk -v head="A " -f bench/node-summary.awk report.txt
$1 == "send" { sends = $3; sp99 = $8 }
$1 == "delivery" && $2 ~ /^[0-9]+$/ { dels = $3; dp50 = $6; dp99 = $8 }
$1 == "sync" { syncs = $3 }
/peak RSS/ { rss = $4 " " $5 }
END {
  printf "%s sends/s %8s  send p99 %8s  deliveries/s %9s  delivery p50/p99 %s / %s  syncs/s %8s  RSS %s\n",
    head, sends, sp99, dels ? dels : "-", dp50 ? dp50 : "-", dp99 ? dp99 : "-", syncs ? syncs : "-", rss
}
