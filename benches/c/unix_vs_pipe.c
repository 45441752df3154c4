/* What a round trip costs at the OS level, without multiproc: a parent and
 * a forked child ping-pong 24-byte messages (the size of a framed u64)
 * 100,000 times, five rounds, microseconds per round trip.
 *
 *   gcc -O2 -o /tmp/unix_vs_pipe benches/c/unix_vs_pipe.c
 *   for m in 0 1 2; do /tmp/unix_vs_pipe $m; done
 *
 * mode 0: two pipe(2)s, read/write
 * mode 1: a Unix stream socket pair, read/write
 * mode 2: a Unix stream socket pair, sendmsg/recvmsg with room for 253
 *         descriptors (what Connection did before it moved to pipes)
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define N 100000
#define SZ 24
static int mode;
static ssize_t snd(int fd, char*b,int n){
  if(mode==2){struct iovec io={b,n};struct msghdr m={0};m.msg_iov=&io;m.msg_iovlen=1;return sendmsg(fd,&m,MSG_NOSIGNAL);}
  return write(fd,b,n);}
static char cbuf[CMSG_SPACE(253*4)];
static ssize_t rcv(int fd, char*b,int n){
  if(mode==2){struct iovec io={b,n};struct msghdr m={0};m.msg_iov=&io;m.msg_iovlen=1;m.msg_control=cbuf;m.msg_controllen=sizeof cbuf;return recvmsg(fd,&m,MSG_CMSG_CLOEXEC);}
  return read(fd,b,n);}
int main(int argc,char**argv){
  mode=atoi(argv[1]); // 0 pipe, 1 unix read/write, 2 unix sendmsg/recvmsg
  int a[2],b[2];
  if(mode==0){pipe2(a,O_CLOEXEC);pipe2(b,O_CLOEXEC);} else {socketpair(AF_UNIX,SOCK_STREAM,0,a);b[0]=a[1];b[1]=a[0];}
  // parent writes a[1], reads b[0]; child reads a[0], writes b[1]
  pid_t p=fork();
  char buf[SZ]={0};
  if(p==0){ for(;;){ if(rcv(a[0],buf,SZ)<=0)_exit(0); snd(b[1],buf,SZ);} }
  for(int r=0;r<5;r++){
  double t=now();
  for(int i=0;i<N;i++){snd(a[1],buf,SZ);rcv(b[0],buf,SZ);}
  printf("mode %d: %.2f us\n",mode,(now()-t)/N*1e6);
  }
  kill(p,9);wait(0);
}
